"""The language-model pretraining recipe (MLM for encoders, CLM for decoders).

Assembles packed LM rows, the task and the validation pass, and hands them to
the one loop (``jtl.run.loop``); the model is born by ``jtl.run.birth``.
"""
from __future__ import annotations

import json
import logging
import math

import jax

from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.data import lm, sft
from jtl.data.pipeline import eval_batches, steps_per_epoch, train_iterator
from jtl.data.sources import get_text, read_rows
from jtl.data.tokenizer import special_ids
from jtl.metrics import MetricWriter, train_flops_per_step
from jtl.run import birth
from jtl.run.lock import run_lock
from jtl.run.loop import Evaluation, train_loop
from jtl.tasks import TaskSpec, mlm_max_predictions
from jtl.tasks import get as get_task
from jtl.train import Setup

log = logging.getLogger("jtl")


def _texts(cfg: Config, source: str, split: str):
    rows = read_rows(source, split=split, text_field=cfg.data.text_field, hf_config=cfg.data.hf_config,
                     limit=cfg.data.max_examples)
    return [get_text(r, cfg.data.text_field) for r in rows], [r.where for r in rows]


def evaluate_lm(setup: Setup, arrays: dict, batch_size: int) -> dict:
    """Validation loss / perplexity / token accuracy over every row exactly once."""
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


def generation_eval(setup: Setup, tok, rows, cfg: Config, batch_size: int):
    """SFT validation by generation (``task.generate_metric``): a function that completes
    the validation prompts greedily with the KV-cache generator on ``setup``'s current
    parameters and scores the completions against the reference responses."""
    from flax import nnx

    from jtl.evaluation import generation_score
    from jtl.generate import from_setup
    t = cfg.task
    rows = rows[:t.generate_examples] if t.generate_examples else rows
    room = min(cfg.data.seq_len, cfg.model.max_len - t.generate_tokens)
    if room < 1:
        raise ConfigError(f"task.generate_tokens={t.generate_tokens} leaves no room for a prompt in "
                          f"model.max_len={cfg.model.max_len}")
    prompts, references = zip(*(sft.generation_prompt(tok, r, cfg) for r in rows))
    prompts = [p[-room:] for p in prompts]  # a long prompt keeps its end
    gen = None

    def run() -> dict:
        nonlocal gen
        if gen is None:
            gen = from_setup(setup, tok)
        else:  # the same Generator: its prefill and decode programs compile once per run
            gen.params = nnx.split(setup.model())[1]
        texts = [c.text for c in gen.generate(prompts, max_new_tokens=t.generate_tokens, batch_size=batch_size)]
        log.info("generated %d completions, e.g. %r (reference %r)", len(texts), texts[0], references[0])
        return {t.generate_metric: generation_score(t.generate_metric, texts, list(references))}
    return run


def pretrain(cfg: Config, load_params=None, on_step=None) -> dict:
    """Run MLM/CLM pretraining as configured; returns the summary (also summary.json).

    The state is born by ``jtl.run.birth`` (own checkpoint > checkpoint.resume_from >
    model.init_from > random) and resumes exactly: params, optimizer state (the step
    RNG derives from its counter) and data iterator. On SIGTERM/SIGINT it checkpoints
    the current step and raises ``Preempted`` (exit code 75, see jtl.preemption).
    ``load_params`` overrides the model.init_from loader; ``on_step(step, guard)`` is
    called after each step (tests use it to request a stop).
    """
    with run_lock(cfg.out_dir):  # one writer per run directory
        return _pretrain(cfg, load_params, on_step)


def _pretrain(cfg: Config, load_params, on_step) -> dict:
    if not cfg.data.train:
        raise ConfigError("data.train is required (file, folder, glob or HF dataset name)")
    task = get_task(cfg.task.kind)
    if not task.pretraining:
        raise ConfigError(f"task.kind={cfg.task.kind!r} is fine-tuning: use jtl.finetune")
    cfg = birth.resolve(cfg)
    out_dir, kind = cfg.out_dir, task.name
    metric = task.metric(cfg)
    mesh = S.make_mesh(cfg.mesh)
    S.check_model_fits(cfg.model, mesh)
    S.check_batch_fits(cfg.train.batch_size, cfg.train.microbatches, mesh)
    if kind == "sft":  # prompt/response or chat rows; the loss only on the responses
        read = lambda source, split: read_rows(source, split=split, text_field=cfg.data.prompt_field,
                                               hf_config=cfg.data.hf_config, limit=cfg.data.max_examples)
        train_rows = read(cfg.data.train, "train")
        needs_texts = birth.tokenizer_source(cfg, out_dir) is None
        tok = birth.tokenizer(cfg, sft.sft_texts(train_rows, cfg) if needs_texts else None, out_dir)
        rows = sft.build_sft_rows(train_rows, tok, cfg)
        val_source = read(cfg.data.validation, "validation") if cfg.data.validation else None
        val_rows = sft.build_sft_rows(val_source, tok, cfg) if val_source is not None else None
    else:
        texts, wheres = _texts(cfg, cfg.data.train, "train")
        tok = birth.tokenizer(cfg, texts, out_dir)

        def rows_of(t, w):
            return lm.build_lm_rows(t, w, tok, kind=kind, seq_len=cfg.data.seq_len,
                                    vocab_limit=cfg.model.vocab_size, pack_rows=cfg.data.pack)

        rows = rows_of(texts, wheres)
        val_rows = rows_of(*_texts(cfg, cfg.data.validation, "validation")) if cfg.data.validation else None
    n_rows = len(rows["input_ids"])
    total = cfg.train.steps or max(1, int(cfg.train.epochs * steps_per_epoch(n_rows, cfg.train.batch_size)))
    P = mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob) if kind == "mlm" else 0
    spec = TaskSpec(mask_id=special_ids(tok)["mask"] or 0, max_predictions=P)
    real = int((rows["segment_ids"] > 0).sum())
    log.info("%s: %d rows of %d tokens (%.1f%% real tokens), %d steps", kind, n_rows, cfg.data.seq_len,
             100 * real / rows["segment_ids"].size, total)

    ckdir = out_dir / "checkpoints"
    setup, resumed, done = birth.begin(cfg, spec, mesh, total, out_dir, load_params, tok)
    if done is not None:
        return done
    it = train_iterator(rows, cfg.train.batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    by_generation = generation_eval(setup, tok, val_source, cfg, eval_bs) if cfg.task.generate_metric else None

    def validate_lm() -> dict:
        out = evaluate_lm(setup, val_rows, eval_bs)
        return {**out, **by_generation()} if by_generation is not None else out
    validate = validate_lm if val_rows is not None else None
    evaluation = Evaluation(metric, task.metric_mode(cfg, metric), validate, cfg.train.eval_every,
                            cfg.train.patience)
    def flops(width: int) -> float:  # packed rows: every batch is seq_len wide
        return train_flops_per_step(cfg.model, cfg.train.batch_size, width, task.head, P,
                                    freeze=cfg.optim.freeze)  # sft: the clm head
    writer = MetricWriter(out_dir, fresh=resumed.step == 0)
    try:
        out = train_loop(cfg, setup, it, total=total, ckdir=ckdir, writer=writer, evaluation=evaluation,
                         flops_per_step=flops, resumed=resumed, on_step=on_step)
        summary = {"steps": total, "train_wall_s": out.train_wall_s, "resumed_from_step": out.start,
                   **{f"train_{k}": v for k, v in out.last.items()}}
        if validate is not None:
            at_end = [h for h in out.history if h["step"] == out.step]
            ev = {k: v for k, v in at_end[-1].items() if k != "step"} if at_end else validate()
            summary.update({f"validation_{k}": v for k, v in ev.items()})
    finally:
        writer.close()
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
