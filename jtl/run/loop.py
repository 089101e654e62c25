"""The one training loop, shared by pretraining and fine-tuning.

``train_loop`` runs the jitted step over a checkpointable batch iterator and owns
everything that is policy rather than model:

* metrics one step late (the host never waits on the device): console bar with
  ETA, ``metrics.jsonl`` and TensorBoard (``StepLogger``);
* the evaluation schedule (every ``train.eval_every`` steps and at the end),
  the best step by the task's metric, early stopping after ``train.patience``
  evaluations without improvement;
* one checkpoint policy: every ``checkpoint.every`` steps, at evaluations (with
  ``checkpoint.keep_best``: when the metric improved), at the last step and on
  preemption; retention by ``checkpoint.keep`` / ``keep_every`` / ``keep_best``;
  every save carries the data iterator state and the loop's history, and none is
  ever made of a non-finite state;
* preemption (SIGTERM/SIGINT -> checkpoint this step, exit code 75) and
  ``try/finally`` clean-up (a save in flight commits, the manager closes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jtl import checkpoint as ckpt
from jtl import preemption
from jtl import sharding as S
from jtl.config import Config
from jtl.metrics import MetricWriter, mesh_peak_flops, progress
from jtl.train import Setup

log = logging.getLogger("jtl")


class StepLogger:
    """Reads step metrics one step late so the host never waits on the device."""

    def __init__(self, cfg: Config, setup: Setup, writer: MetricWriter, total: int, start: int,
                 skipped: int = 0):
        self.cfg, self.writer = cfg, writer
        self.peak, self.peak_source = mesh_peak_flops(setup.mesh)
        self.mfu_warned = False
        self.pending = None
        self._new_window()
        self.bar = progress(total, cfg.train.progress)
        self.bar.update(start)
        self.last = {}
        self.skipped = skipped
        self.skipped_in_a_row = 0
        self.real_total = self.padded_total = 0  # tokens of the global batches handled

    def _new_window(self):
        self.window_t, self.window_tokens, self.window_padded, self.window_steps = time.perf_counter(), 0, 0, 0
        self.window_flops = 0.0

    def push(self, step: int, metrics, padded_tokens: int, flops: float):
        """Step ``step`` was dispatched; ``padded_tokens`` / ``flops``: the global batch's
        token slots and model FLOPs (its shape); its real tokens come with its metrics."""
        if self.pending is not None:
            self._handle(*self.pending)
        self.pending = (step, metrics, padded_tokens, flops)

    def flush(self):
        if self.pending is not None:
            self._handle(*self.pending)
            self.pending = None
        self.bar.close()

    def _skip(self, step, metrics):
        """train.nan_policy=skip: the step left the state unchanged; say so every time,
        and stop after train.max_consecutive_skips in a row (the run is not training)."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_consecutive_skips
        log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): update skipped "
                    "(%d in a row, %d in this run)", step, float(metrics["loss"]), float(metrics["grad_norm"]),
                    self.skipped_in_a_row, self.skipped)
        if limit and self.skipped_in_a_row >= limit:
            raise FloatingPointError(
                f"step {step}: {self.skipped_in_a_row} updates in a row skipped as non-finite "
                f"(train.max_consecutive_skips={limit}); stopping: the model is not training "
                f"(lower optim.lr, set optim.clip_norm, or check the data)")

    def _handle(self, step, metrics, padded_tokens, flops):
        # One transfer for the two scalars read every step (real tokens are summed over
        # every process's rows on device); the rest only on logging steps.
        real_tokens, finite = jax.device_get((metrics["real_tokens"], metrics["finite"]))
        real_tokens, finite = int(real_tokens), bool(finite)
        self.real_total += real_tokens
        self.padded_total += padded_tokens
        self.window_tokens += real_tokens
        self.window_padded += padded_tokens
        self.window_flops += flops
        self.window_steps += 1
        if not finite:
            if self.cfg.train.nan_policy == "stop":
                loss = float(metrics["loss"])
                raise FloatingPointError(f"step {step}: non-finite loss/gradient (loss={loss}, "
                                         f"grad_norm={float(metrics['grad_norm'])}); stopping "
                                         f"(train.nan_policy=skip skips such updates)")
            self._skip(step, metrics)
        else:
            self.skipped_in_a_row = 0
        self.bar.update(1)
        if step % self.cfg.train.log_every == 0 or step == self.bar.total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - self.window_t
            m.update(real_tokens_per_s=self.window_tokens / dt, padded_tokens_per_s=self.window_padded / dt,
                     step_time=dt / self.window_steps,
                     mfu=self.window_flops / dt / self.peak, skipped_updates=self.skipped)
            if m["mfu"] > 1.0 and not self.mfu_warned:
                self.mfu_warned = True  # impossible: the FLOP count or the peak is wrong
                log.warning("step %d: MFU %.1f%% is above 100%%: jtl's FLOP count or the peak (%s, %.3g "
                            "FLOP/s) is wrong for this run; please report it", step, 100 * m["mfu"],
                            self.peak_source, self.peak)
            m.pop("step", None)
            self.writer.write(step, m)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['real_tokens_per_s']:.0f}",
                                 mfu=f"{m['mfu']:.1%}")
            self.last = m
            self._new_window()


@dataclass
class Evaluation:
    """How the loop evaluates: ``run()`` scores the current ``setup.state`` on the
    validation data (None: no validation data; eval points then only checkpoint)."""
    metric: str
    mode: str = "max"  # max | min
    run: Callable[[], dict] | None = None
    every: int = 0  # 0 = only at the end
    patience: int = 0

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)


@dataclass
class Outcome:
    """What happened in the loop (recipes turn it into summary.json)."""
    start: int
    step: int  # the last step run
    total: int
    stopped_early: bool = False
    history: list = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    train_wall_s: float = 0.0  # training only (evaluation and saves inside the loop excluded)
    eval_s: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    skipped_updates: int = 0
    last: dict = field(default_factory=dict)  # the last logged train metrics


def train_loop(cfg: Config, setup: Setup, batches, *, total: int, ckdir: Path, writer: MetricWriter,
               evaluation: Evaluation, flops_per_step: Callable[[int], float], resumed=None,
               restore_best: bool = False, on_step: Callable | None = None) -> Outcome:
    """Train ``setup`` from ``resumed.step`` (see ``jtl.run.birth``) to ``total``.

    ``batches``: an iterator of this process's rows of each global batch (numpy
    dicts) with ``get_state``/``set_state``. ``flops_per_step(width)``: model FLOPs of a step
    whose rows are ``width`` tokens wide (bucketed batches: MFU counts each batch's own
    width, never an average that short batches would beat). ``restore_best``: leave the best step's
    parameters in ``setup.state`` at the end (fine-tuning). ``on_step(step, guard)`` is
    called after each step (tests and callbacks: ``guard.request()`` stops the run at
    this step as SIGTERM would)."""
    ck = cfg.checkpoint
    start = resumed.step if resumed is not None else 0
    meta = resumed.meta if resumed is not None else {}
    if resumed is not None and resumed.data_state:
        batches.set_state(resumed.data_state)
    prior = meta.get("loop", {})
    out = Outcome(start=start, step=start, total=total, history=list(prior.get("history", [])),
                  best=prior.get("best"), best_step=prior.get("best_step"))
    bad_evals = prior.get("bad_evals", 0)
    if start:
        log.info("continuing at step %d of %d (best %s so far: %s at step %s)", start, total,
                 evaluation.metric, out.best, out.best_step)
    mngr = ckpt.manager(ckdir, keep=ck.keep, async_save=ck.async_save, keep_every=ck.keep_every,
                        best_metric=evaluation.metric if ck.keep_best and evaluation.run is not None else None,
                        best_mode=evaluation.mode)
    logger = StepLogger(cfg, setup, writer, total, start, skipped=int(meta.get("skipped_updates", 0)))
    every = ck.every if ck.enabled else 0
    state, metrics = setup.state, None
    saved_at = None

    def save(step: int, values: dict | None = None) -> None:
        """Checkpoint ``state`` at ``step`` unless it is non-finite (never the latest then)."""
        nonlocal saved_at
        finite = metrics is None or bool(metrics["finite"])
        last = mngr.latest_step()
        if not finite and cfg.train.nan_policy == "stop":
            raise FloatingPointError(f"step {step}: non-finite loss/gradient (loss={float(metrics['loss'])}); "
                                     f"stopping without checkpointing it (last checkpoint: step {last}; "
                                     f"train.nan_policy=skip skips such updates)")
        if not ckpt.all_finite(state):
            raise FloatingPointError(f"step {step}: parameters or optimizer state are non-finite; not "
                                     f"checkpointing them (last checkpoint: step {last})")
        loop_meta = {"history": out.history, "best": out.best, "best_step": out.best_step,
                     "bad_evals": bad_evals}
        ckpt.save(mngr, step, state, cfg.to_dict(), batches.get_state(),
                  meta={"skipped_updates": logger.skipped + (not finite), "loop": loop_meta},
                  metrics=values, force=True)
        saved_at = step

    t0 = time.perf_counter()
    try:
        with preemption.Guard() as guard, jax.log_compiles(False):
            log.info("training steps %d-%d (the first one compiles the step)", start + 1, total)
            for step in range(start + 1, total + 1):
                host = next(batches)  # this process's rows of the global batch
                width = np.shape(host["segment_ids"])[1]
                state, metrics = setup.train_step(state, S.global_batch(setup.mesh, host))
                logger.push(step, metrics, cfg.train.batch_size * width, flops_per_step(width))
                out.step = step
                if on_step is not None:
                    on_step(step, guard)
                if guard.stop_requested(step) and step < total:  # SIGTERM: checkpoint this step, exit 75
                    save(step)
                    ckpt.wait(mngr)
                    logger.flush()
                    err = preemption.Preempted(step, str(ckdir))
                    log.warning("%s; exiting with code %d", err, preemption.EXIT_PREEMPTED)
                    raise err
                is_eval = step == total or (evaluation.every and step % evaluation.every == 0)
                if is_eval:
                    t_eval = time.perf_counter()
                    setup.state = state
                    name = evaluation.metric
                    if evaluation.run is None:  # no validation data: the latest step is the result
                        out.best_step = step
                        save(step)
                    else:
                        ev = evaluation.run()
                        writer.write(step, ev, "validation")
                        out.history.append({"step": step, **ev})
                        log.info("step %d validation: %s", step, " ".join(
                            f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float)))
                        improved = evaluation.better(ev[name], out.best)
                        if improved:
                            out.best, out.best_step, bad_evals = ev[name], step, 0
                        else:
                            bad_evals += 1
                        if improved or not ck.keep_best:
                            save(step, {name: float(ev[name])})
                        elif step == total:  # the last step, not the best: no metric, so a tie
                            save(step)  # cannot make retention drop the best step
                    out.eval_s += time.perf_counter() - t_eval
                    if evaluation.run is not None and evaluation.patience and bad_evals >= evaluation.patience:
                        log.info("early stopping at step %d: no %s improvement in %d evaluations", step, name,
                                 bad_evals)
                        out.stopped_early = True
                        break
                if every and step % every == 0 and saved_at != step:
                    save(step)
        logger.flush()
        setup.state = state
        out.train_wall_s = time.perf_counter() - t0 - out.eval_s
        out.skipped_updates, out.last = logger.skipped, logger.last
        out.real_tokens, out.padded_tokens = logger.real_total, logger.padded_total
        ckpt.wait(mngr)
        if restore_best and out.best_step is not None and out.best_step != out.step:
            setup.state, _, _ = ckpt.restore_state(mngr, out.best_step, setup.state)
    finally:
        try:  # whatever stopped the loop, let a save in flight commit (and record its checksums)
            ckpt.wait(mngr)
        except Exception as e:  # already reported by ckpt.wait / ckpt.save when it matters
            log.error("checkpoint save failed: %s", e)
        mngr.close()
        ckpt.empty_trash(ckdir)
    return out
