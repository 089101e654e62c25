"""The fine-tuning recipe: supervised training, evaluation and prediction from a run directory.

``finetune(cfg)`` reads the splits named in ``data.*``, encodes them with the
task of ``task.kind`` (``jtl.tasks``), has the model born by ``jtl.run.birth``
(the jitted step compiles once per bucket width) and hands the bucketed batches
and the validation pass to the one loop (``jtl.run.loop``): evaluation every
``train.eval_every`` steps and at the end, the best checkpoint by
``task.metric``, early stopping after ``train.patience`` evaluations without
improvement; the test split is then scored with the best parameters. The run
directory holds everything ``jtl eval RUN_DIR`` and ``jtl predict RUN_DIR``
need: config.yaml (with the resolved label list), tokenizer/, checkpoints/ and
summary.json (with ``best_step``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from jtl import config as C
from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.data import fewshot
from jtl.data import tasks as T
from jtl.data.sources import DataError, Row, read_rows
from jtl.metrics import MetricWriter, train_flops_per_step
from jtl.run import birth
from jtl.run.lock import run_lock
from jtl.run.loop import Evaluation, train_loop
from jtl.tasks import TaskSpec
from jtl.tasks import get as get_task
from jtl.train import Setup

log = logging.getLogger("jtl")
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------- data


def read_split(cfg: Config, split: str, source: str | None = None) -> list[Row] | None:
    source = source or getattr(cfg.data, split)
    if not source:
        return None
    return read_rows(source, split=split, text_field=cfg.data.text_field, hf_config=cfg.data.hf_config,
                     limit=cfg.data.max_examples)


def _texts_for_tokenizer(rows: list[Row], cfg: Config) -> list[str]:
    from jtl.data.sources import get_text
    fields = [cfg.data.text_field] + ([cfg.data.text_pair_field] if cfg.data.text_pair_field else [])
    return [get_text(r, f) for r in rows for f in fields]


def num_labels(cfg: Config) -> int:
    return get_task(cfg.task.kind).num_labels(cfg)


def metric_name(cfg: Config) -> str:
    return get_task(cfg.task.kind).metric(cfg)


def _eval_batch_size(cfg: Config, mesh) -> int:
    b = cfg.train.eval_batch_size or cfg.train.batch_size
    per = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(per, b // per * per)


# ---------------------------------------------------------------- inference


def run_model(setup: Setup, enc: T.Encoded, batch_size: int) -> tuple[np.ndarray, dict]:
    """Head outputs for every feature of ``enc`` (in feature order) and the mean loss.

    Batches are grouped by bucket; the last batch of each bucket is padded with
    weight-0 rows, so each feature is counted exactly once."""
    out_logits = None
    loss_sum = count = 0.0
    for idx, width in T.eval_plan(enc, setup.cfg.data, batch_size):
        out = setup.eval_step(setup.state, S.global_batch(setup.mesh, T.take_share(enc, idx, width, batch_size)))
        if jax.process_count() > 1:  # logits are sharded over hosts: gather them everywhere
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        out = jax.device_get(out)
        logits = np.asarray(out["logits"], np.float32)[:len(idx)]
        if out_logits is None:
            shape = (len(enc),) + ((enc.arrays["input_ids"].shape[1],) if logits.ndim == 3 else ()) + \
                logits.shape[-1:]
            out_logits = np.zeros(shape, np.float32)
        if logits.ndim == 3:
            out_logits[idx, :width] = logits
        else:
            out_logits[idx] = logits
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
    return out_logits, {"loss": loss_sum / max(count, 1.0), "n": int(enc.n_rows)}


def decode(cfg: Config, enc: T.Encoded, logits: np.ndarray) -> list[dict]:
    """Per-row predictions: label + probabilities, score, labels, tags or answer span."""
    return get_task(cfg.task.kind).decode(cfg, enc, logits)


def score(cfg: Config, enc: T.Encoded, logits: np.ndarray, preds: list[dict] | None = None) -> dict:
    return get_task(cfg.task.kind).score(cfg, enc, logits, preds)


def evaluate(setup: Setup, enc: T.Encoded, batch_size: int) -> dict:
    t = time.perf_counter()
    logits, base = run_model(setup, enc, batch_size)
    out = {**base, **score(setup.cfg, enc, logits)}
    out["eval_s"] = round(time.perf_counter() - t, 2)
    return out


def encode_split(cfg: Config, rows: list[Row], tok, with_labels: bool = True) -> T.Encoded:
    return get_task(cfg.task.kind).encode(rows, cfg, tok, cfg.data.labels, with_labels=with_labels)


# ---------------------------------------------------------------- training


def prepare(cfg: Config):
    """(cfg with resolved labels/model, tokenizer, {split: rows}) for a fine-tuning run."""
    if get_task(cfg.task.kind).pretraining:
        raise ConfigError(f"task.kind={cfg.task.kind!r} is pretraining: use jtl.pretrain")
    if not cfg.data.train:
        raise ConfigError("data.train is required (file, folder, glob or HF dataset name)")
    cfg = birth.resolve(cfg)
    rows = {s: read_split(cfg, s) for s in SPLITS}
    labels = T.infer_labels(rows["train"], cfg, get_task(cfg.task.kind).labels_from_data)
    if labels is not None and labels != cfg.data.labels:
        log.info("labels (%d): %s", len(labels), ", ".join(labels[:20]))
        cfg = cfg.replace(**{"data.labels": list(labels)})
    if labels is not None and len(labels) < 2 and cfg.task.kind == "classification":
        raise DataError(f"{cfg.data.train}: only one label ({labels}) in field {cfg.data.label_field!r}")
    rows["train"] = fewshot.subset(rows["train"], cfg, labels)  # after the labels: same classes per budget
    if cfg.task.class_weights and len(cfg.task.class_weights) != num_labels(cfg):
        raise ConfigError(f"task.class_weights has {len(cfg.task.class_weights)} values for "
                          f"{num_labels(cfg)} labels")
    texts = _texts_for_tokenizer(rows["train"], cfg) if birth.tokenizer_source(cfg, cfg.out_dir) is None \
        else None
    tok = birth.tokenizer(cfg, texts, cfg.out_dir)
    return cfg, tok, rows


def finetune(cfg: Config, load_params=None, on_step=None) -> dict:
    """Train ``cfg`` (a fine-tuning task); returns the summary also written to summary.json.

    ``load_params`` overrides the model.init_from loader; ``on_step(step, guard)`` is
    called after each step (tests and callbacks: ``guard.request()`` stops the run at
    this step as SIGTERM would)."""
    with run_lock(cfg.out_dir):  # one writer per run directory
        return _finetune(cfg, load_params, on_step)


def _finetune(cfg: Config, load_params, on_step) -> dict:
    t_start = time.perf_counter()
    out_dir = cfg.out_dir
    cfg, tok, rows = prepare(cfg)
    task = get_task(cfg.task.kind)
    mesh = S.make_mesh(cfg.mesh)
    if rows["test"] is not None and not _has_labels(rows["test"], cfg):
        log.info("%s: unlabelled test split (label -1): not scored", cfg.data.test)
        rows["test"] = None
    enc = {s: encode_split(cfg, r, tok) for s, r in rows.items() if r is not None}
    for s, e in enc.items():
        if e.truncated:
            log.warning("%s: %d of %d rows longer than data.seq_len=%d (%s)", s, e.truncated, e.n_rows,
                        cfg.data.seq_len, "split into windows" if task.head == "span" else "truncated")
    buckets = C.bucket_lengths(cfg.data)
    B = cfg.train.batch_size
    per_epoch = T.batches_per_epoch(enc["train"].lengths, buckets, B)
    total = cfg.train.steps or max(1, int(round(cfg.train.epochs * per_epoch)))
    spec = TaskSpec(num_labels=task.num_labels(cfg))
    if task.head == "token" and cfg.task.token_weighting == "equal":
        labelled = (enc["train"].arrays["labels"] >= 0).sum(1)
        spec = dataclasses.replace(spec, label_tokens_per_row=max(float(labelled.mean()), 1.0))
    metric = task.metric(cfg)
    log.info("%s: %d train rows (%d features), %d batches/epoch, %d steps, buckets %s, metric %s",
             cfg.task.kind, enc["train"].n_rows, len(enc["train"]), per_epoch, total, buckets, metric)

    t_build = time.perf_counter()
    ckdir = out_dir / "checkpoints"
    setup, resumed, done = birth.begin(cfg, spec, mesh, total, out_dir, load_params, tok)
    if done is not None:
        return done

    def flops(width: int) -> float:  # each bucketed batch's own width (MFU of short batches)
        return train_flops_per_step(cfg.model, B, width, cfg.task.kind, freeze=cfg.optim.freeze)
    eval_bs = _eval_batch_size(cfg, mesh)
    val = enc.get("validation")
    evaluation = Evaluation(metric, task.metric_mode(cfg, metric),
                            (lambda: evaluate(setup, val, eval_bs)) if val is not None else None,
                            cfg.train.eval_every, cfg.train.patience)
    it = T.BucketedBatches(enc["train"], cfg.data, B, cfg.train.seed + cfg.data.seed, resumed.step)
    writer = MetricWriter(out_dir, fresh=resumed.step == 0)
    try:
        t0 = time.perf_counter()
        out = train_loop(cfg, setup, it, total=total, ckdir=ckdir, writer=writer, evaluation=evaluation,
                         flops_per_step=flops, resumed=resumed, restore_best=True, on_step=on_step)
        wall = max(out.train_wall_s, 1e-9)
        summary = {"task": cfg.task.kind, "metric": metric, "best_step": out.best_step,
                   "best_metric": out.best, "steps_run": out.step, "total_steps": total,
                   "stopped_early": out.stopped_early, "train_rows": enc["train"].n_rows,
                   "truncated": {s: e.truncated for s, e in enc.items()},
                   "train_wall_s": round(out.train_wall_s, 2), "eval_in_loop_s": round(out.eval_s, 2),
                   "setup_s": round(t0 - t_build, 2),
                   "real_tokens_per_s": out.real_tokens / wall,
                   "padded_tokens_per_s": out.padded_tokens / wall,
                   "padding_fraction": 1 - out.real_tokens / max(out.padded_tokens, 1),
                   **{f"train_{k}": v for k, v in out.last.items()}}
        final = {}
        if val is not None:
            done = [h for h in out.history if h["step"] == out.best_step]
            final["validation"] = done[0] if done else evaluate(setup, val, eval_bs)  # e.g. resumed at the end
        if "test" in enc:
            final["test"] = evaluate(setup, enc["test"], eval_bs)
            writer.write(out.best_step or out.step, final["test"], "test")
        summary["final"] = final
        summary["history"] = out.history
        summary["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    finally:
        writer.close()
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _has_labels(rows: list[Row], cfg: Config) -> bool:
    """GLUE test splits carry label -1 (unlabelled): skip scoring them."""
    v = rows[0].data.get(cfg.data.label_field)
    return v is not None and v != -1


# ---------------------------------------------------------------- from a run directory


def load_run(run_dir: str | Path, config_path: str | None = None, overrides=()):
    """(cfg, tokenizer, Setup with the best parameters) of a finished fine-tuning run."""
    cfg, tok, setup = birth.from_run(run_dir, config_path, overrides)
    if get_task(cfg.task.kind).pretraining:
        raise ConfigError(f"{run_dir} is a task.kind={cfg.task.kind} pretraining run: jtl eval and jtl predict "
                          f"take fine-tuned runs (its validation loss is in {run_dir}/summary.json; fine-tune "
                          f"it with model.init_from={run_dir})")
    return cfg, tok, setup


def evaluate_run(run_dir, config_path=None, overrides=(), split: str = "validation") -> dict:
    cfg, tok, setup = load_run(run_dir, config_path, overrides)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    rows = read_split(cfg, split)
    if rows is None:
        raise ConfigError(f"data.{split} is not set in {run_dir}/config.yaml (override data.{split}=...)")
    enc = encode_split(cfg, rows, tok)
    return {"split": split, **evaluate(setup, enc, _eval_batch_size(cfg, setup.mesh))}


def predict_file(run_dir, input_path, output_path, overrides=(), chunk_rows: int = 4096) -> int:
    """Predictions for every row of ``input_path`` as JSONL, written chunk by chunk.

    Each output line has ``row`` (0-based input row), the input's ``id``/``idx``
    when present, and the prediction (label + probabilities, score, labels, tags or
    answer span)."""
    out = Path(output_path)
    if out.exists() and out.resolve() == Path(input_path).resolve():
        raise ConfigError(f"--output {out} is the input file: refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # the old output survives a failure
    try:  # before the model loads: an unwritable --output fails at once, naming it
        out.parent.mkdir(parents=True, exist_ok=True)
        open(tmp, "w").close()
        tmp.unlink()
    except OSError as e:
        raise ConfigError(f"--output {out}: cannot write there ({e.strerror or e}); choose a writable path") from e
    cfg, tok, setup = load_run(run_dir, None, overrides)
    rows = read_rows(str(input_path), split="test", text_field=cfg.data.text_field,
                     hf_config=cfg.data.hf_config)
    bs = _eval_batch_size(cfg, setup.mesh)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for at in range(0, len(rows), chunk_rows):
                part = rows[at:at + chunk_rows]
                enc = encode_split(cfg, part, tok, with_labels=False)
                logits, _ = run_model(setup, enc, bs)
                for i, (r, p) in enumerate(zip(part, decode(cfg, enc, logits))):
                    ids = {k: r.data[k] for k in ("id", "idx") if k in r.data}
                    f.write(json.dumps({"row": at + i, **ids, **p}, ensure_ascii=False) + "\n")
                    n += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n
