"""The language-model pretraining run (MLM for encoders, CLM for decoders)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from jtl import checkpoint as ckpt
from jtl import preemption
from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.data import lm
from jtl.data.pipeline import eval_batches, steps_per_epoch, train_iterator
from jtl.data.sources import get_text, read_rows
from jtl.data.tokenizer import load_tokenizer, special_ids, train_tokenizer
from jtl.metrics import MetricWriter, peak_flops_per_device, progress, train_flops_per_step
from jtl.tasks import TaskSpec, mlm_max_predictions
from jtl.train import Setup, build

log = logging.getLogger("jtl")


def get_tokenizer(cfg: Config, texts: list[str] | None, out_dir: Path):
    """Configured tokenizer, the init_from model's, the run's own, or a newly trained one."""
    source = cfg.data.tokenizer or cfg.model.init_from
    if source and str(source).endswith(".gguf"):  # the tokenizer embedded in the GGUF file
        from jtl.weights import load_hf_tokenizer_dir
        source = load_hf_tokenizer_dir(str(source))
    if source and (Path(source) / "checkpoints").is_dir():  # a jtl run: use its tokenizer
        source = str(Path(source) / "tokenizer")
    if source:
        tok = load_tokenizer(source)
    elif (out_dir / "tokenizer" / "tokenizer.json").exists():
        tok = load_tokenizer(str(out_dir / "tokenizer"))
    else:
        if texts is None:
            raise ConfigError("data.tokenizer is not set and there is no training text to train one")
        kind = "bpe" if cfg.model.causal else "wordpiece"
        log.info("training a %s tokenizer (%d tokens) on %d texts", kind, cfg.data.tokenizer_vocab, len(texts))
        tok = train_tokenizer(texts, cfg.data.tokenizer_vocab, kind=kind, lowercase=cfg.data.lowercase)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}: ids >= vocab_size would be silently clamped; "
                          f"set model.vocab_size >= {len(tok)}")
    tok.save_pretrained(str(out_dir / "tokenizer"))
    return tok


def _texts(cfg: Config, source: str, split: str):
    rows = read_rows(source, split=split, text_field=cfg.data.text_field, hf_config=cfg.data.hf_config,
                     limit=cfg.data.max_examples)
    return [get_text(r, cfg.data.text_field) for r in rows], [r.where for r in rows]


def save_run_files(cfg: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())),
                                                        sort_keys=False))


class StepLogger:
    """Reads step metrics one step late so the host never waits on the device."""

    def __init__(self, cfg: Config, setup: Setup, writer: MetricWriter, flops_per_step: float,
                 total: int, start: int):
        self.cfg, self.writer, self.flops = cfg, writer, flops_per_step
        self.peak, self.peak_source = peak_flops_per_device()
        self.n_dev = setup.mesh.size
        self.pending = None
        self.window_t, self.window_tokens, self.window_padded, self.window_steps = time.perf_counter(), 0, 0, 0
        self.bar = progress(total, cfg.train.progress)
        self.bar.update(start)
        self.last = {}
        self.skipped = 0

    def push(self, step: int, metrics, real_tokens: int, padded_tokens: int):
        if self.pending is not None:
            self._handle(*self.pending)
        self.pending = (step, metrics, real_tokens, padded_tokens)

    def flush(self):
        if self.pending is not None:
            self._handle(*self.pending)
            self.pending = None
        self.bar.close()

    def _handle(self, step, metrics, real_tokens, padded_tokens):
        self.window_tokens += real_tokens
        self.window_padded += padded_tokens
        self.window_steps += 1
        finite = bool(metrics["finite"])
        if not finite:
            if self.cfg.train.nan_policy == "stop":
                loss = float(metrics["loss"])
                raise FloatingPointError(f"step {step}: non-finite loss/gradient (loss={loss}, "
                                         f"grad_norm={float(metrics['grad_norm'])}); stopping "
                                         f"(train.nan_policy=skip skips such updates)")
            self.skipped += 1
        self.bar.update(1)
        if step % self.cfg.train.log_every == 0 or step == self.bar.total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - self.window_t
            m.update(real_tokens_per_s=self.window_tokens / dt, padded_tokens_per_s=self.window_padded / dt,
                     step_time=dt / self.window_steps,
                     mfu=self.flops * self.window_steps / dt / (self.peak * self.n_dev),
                     skipped_updates=self.skipped)
            m.pop("step", None)
            self.writer.write(step, m)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['real_tokens_per_s']:.0f}",
                                 mfu=f"{m['mfu']:.1%}")
            self.last = m
            self.window_t, self.window_tokens, self.window_padded, self.window_steps = time.perf_counter(), 0, 0, 0


def evaluate_lm(setup: Setup, arrays: dict, batch_size: int) -> dict:
    loss_sum = count = correct = 0.0
    for batch, _ in eval_batches(arrays, batch_size):
        batch.pop("example_weights")
        out = jax.device_get(setup.eval_step(setup.state, S.global_batch(setup.mesh, batch)))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        correct += float(out.get("correct", 0.0))
    loss = loss_sum / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": correct / max(count, 1.0),
            "tokens": count}


def pretrain(cfg: Config, load_params=None, on_step=None) -> dict:
    """Run MLM/CLM pretraining as configured; returns the final metrics.

    Resumes from RUN_DIR/checkpoints (or checkpoint.resume_from) exactly: params,
    optimizer state (the step RNG derives from its counter) and data iterator. On
    SIGTERM/SIGINT it checkpoints the current step and raises ``Preempted`` (exit
    code 75, see jtl.preemption). ``on_step(step, guard)`` is called after each step
    (tests use it to request a stop).
    """
    out_dir = cfg.out_dir
    kind = cfg.task.kind
    if not cfg.data.train:
        raise ConfigError("data.train is required (file, folder, glob or HF dataset name)")
    if (kind == "mlm") == cfg.model.causal:  # init_from decides the family after validation
        raise ConfigError(f"task.kind={kind!r} does not fit model.family={cfg.model.family!r} "
                          f"(mlm needs bert/roberta, clm needs gpt2/llama)")
    mesh = S.make_mesh(cfg.mesh)
    S.check_model_fits(cfg.model, mesh)
    S.check_batch_fits(cfg.train.batch_size, cfg.train.microbatches, mesh)
    texts, wheres = _texts(cfg, cfg.data.train, "train")
    save_run_files(cfg, out_dir)
    tok = get_tokenizer(cfg, texts, out_dir)
    rows = lm.build_lm_rows(texts, wheres, tok, kind=kind, seq_len=cfg.data.seq_len,
                            vocab_limit=cfg.model.vocab_size, pack_rows=cfg.data.pack)
    val_rows = None
    if cfg.data.validation:
        vt, vw = _texts(cfg, cfg.data.validation, "validation")
        val_rows = lm.build_lm_rows(vt, vw, tok, kind=kind, seq_len=cfg.data.seq_len,
                                    vocab_limit=cfg.model.vocab_size, pack_rows=cfg.data.pack)
    n_rows = len(rows["input_ids"])
    total = cfg.train.steps or max(1, int(cfg.train.epochs * steps_per_epoch(n_rows, cfg.train.batch_size)))
    sp = special_ids(tok)
    P = mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob) if kind == "mlm" else 0
    spec = TaskSpec(mask_id=sp["mask"] or 0, max_predictions=P)
    real = int((rows["segment_ids"] > 0).sum())
    log.info("%s: %d rows of %d tokens (%.1f%% real tokens), %d steps", kind, n_rows, cfg.data.seq_len,
             100 * real / rows["segment_ids"].size, total)

    setup = build(cfg, spec, mesh, total, load_params)
    it = train_iterator(rows, cfg.train.batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    ck = cfg.checkpoint
    ckdir = out_dir / "checkpoints"
    start, skipped = _resume(cfg, setup, it, ckdir)
    mngr = ckpt.manager(ckdir, keep=ck.keep, async_save=ck.async_save, keep_every=ck.keep_every,
                        best_metric=cfg.task.metric if ck.keep_best else None, best_mode=cfg.task.metric_mode)
    writer = MetricWriter(out_dir)
    flops = train_flops_per_step(cfg.model, cfg.train.batch_size, cfg.data.seq_len, kind, P)
    logger = StepLogger(cfg, setup, writer, flops, total, start)
    logger.skipped = skipped
    padded = cfg.train.batch_size * cfg.data.seq_len
    state, metrics = setup.state, None
    every = ck.every if ck.enabled else 0

    def save(step, metrics, extra=None) -> None:
        """Checkpoint ``state`` at ``step`` unless it is non-finite (never the latest then)."""
        finite = metrics is None or bool(metrics["finite"])
        last = mngr.latest_step()
        if not finite and cfg.train.nan_policy == "stop":
            raise FloatingPointError(f"step {step}: non-finite loss/gradient (loss={float(metrics['loss'])}); "
                                     f"stopping without checkpointing it (last checkpoint: step {last}; "
                                     f"train.nan_policy=skip skips such updates)")
        if not ckpt.all_finite(state):
            raise FloatingPointError(f"step {step}: parameters or optimizer state are non-finite; not "
                                     f"checkpointing them (last checkpoint: step {last})")
        values = {"loss": float(metrics["loss"])} if metrics is not None else {}
        ckpt.save(mngr, step, state, cfg.to_dict(), it.get_state(),
                  meta={"skipped_updates": logger.skipped + (not finite)}, metrics={**values, **(extra or {})})

    t0 = time.perf_counter()
    try:
        with preemption.Guard() as guard, jax.log_compiles(False):
            for step in range(start + 1, total + 1):
                host = next(it)
                state, metrics = setup.train_step(state, S.global_batch(mesh, host))
                logger.push(step, metrics, lm.real_tokens(host), padded)
                if on_step is not None:
                    on_step(step, guard)
                if guard.stop_requested(step) and step < total:  # at total the final save does it
                    save(step, metrics)
                    ckpt.wait(mngr)
                    logger.flush()
                    err = preemption.Preempted(step, str(ckdir))
                    log.warning("jtl: %s; exiting with code %d", err, preemption.EXIT_PREEMPTED)
                    raise err
                if every and step % every == 0 and step < total:
                    save(step, metrics)
        logger.flush()
        setup.state = state
        wall = time.perf_counter() - t0
        summary = {"steps": total, "train_wall_s": wall, "resumed_from_step": start,
                   **{f"train_{k}": v for k, v in logger.last.items()}}
        ev = {}
        if val_rows is not None:
            ev = evaluate_lm(setup, val_rows, cfg.train.eval_batch_size or cfg.train.batch_size)
            writer.write(total, ev, "validation")
            summary.update({f"validation_{k}": v for k, v in ev.items()})
        if start < total:
            save(total, metrics, {f"validation_{k}": v for k, v in ev.items()})
        ckpt.wait(mngr)
    finally:
        try:  # whatever stopped the loop, let a save in flight commit
            mngr.wait_until_finished()
        except Exception as e:  # already reported by ckpt.wait / ckpt.save when it matters
            log.error("checkpoint save failed: %s", e)
        mngr.close()
        ckpt.empty_trash(ckdir)
        writer.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _resume(cfg: Config, setup: Setup, it, ckdir: Path) -> tuple[int, int]:
    """Restore state + data iterator from the run's own checkpoints, else from
    checkpoint.resume_from; returns (start step, skipped updates so far)."""
    got = ckpt.resume_run(cfg.checkpoint, ckdir, setup.state, cfg.to_dict())
    if got is None:
        return 0, 0
    setup.state, data_state, step, meta, source = got
    saved = ckpt.read_item(source, step, "config")
    if saved.get("data") != json.loads(json.dumps(cfg.to_dict())).get("data"):
        log.warning("the data config differs from the checkpoint's: the data stream will not "
                    "continue exactly where it stopped")
    if data_state:
        it.set_state(data_state)
    log.info("resumed from %s at step %d", source / str(step), step)
    return step, int(meta.get("skipped_updates", 0))
