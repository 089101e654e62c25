"""Fine-tuning: the supervised loop, evaluation and prediction from a run directory.

``finetune(cfg)`` reads the splits named in ``data.*``, encodes them for
``task.kind`` (jtl.data.tasks), builds the sharded state once per mesh
(jtl.train.build; the jitted step compiles once per bucket width), trains with
evaluation every ``train.eval_every`` steps and at the end, keeps the best
checkpoint by ``task.metric`` (early stopping after ``train.patience``
evaluations without improvement) and evaluates the test split with the best
parameters. The run directory then holds everything ``jtl eval RUN_DIR`` and
``jtl predict RUN_DIR`` need: config.yaml (with the resolved label list),
tokenizer/, checkpoints/ and summary.json (with ``best_step``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from jtl import checkpoint as ckpt
from jtl import config as C
from jtl import evaluation as E
from jtl import preemption
from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.data import tasks as T
from jtl.data.sources import DataError, Row, read_rows
from jtl.metrics import MetricWriter, train_flops_per_step
from jtl.pretrain import StepLogger, get_tokenizer, save_run_files
from jtl.tasks import TaskSpec
from jtl.train import Setup, build

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
    if cfg.task.kind == "regression":
        return 1
    if cfg.task.kind == "qa":
        return 2
    return len(cfg.data.labels or ())


def metric_name(cfg: Config) -> str:
    return cfg.task.metric or E.default_metric(cfg.task.kind, num_labels(cfg))


def _eval_batch_size(cfg: Config, mesh) -> int:
    b = cfg.train.eval_batch_size or cfg.train.batch_size
    per = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(per, b // per * per)


def to_device(mesh, host: dict) -> dict:
    """A global batch (same on every host: the batch plan is deterministic) -> sharded arrays;
    each process contributes its contiguous slice of rows."""
    pc = jax.process_count()
    if pc > 1:
        n = len(host["example_weights"]) // pc
        pi = jax.process_index()
        host = {k: v[pi * n:(pi + 1) * n] for k, v in host.items()}
    return S.global_batch(mesh, host)


# ---------------------------------------------------------------- inference


def run_model(setup: Setup, enc: T.Encoded, batch_size: int) -> tuple[np.ndarray, dict]:
    """Head outputs for every feature of ``enc`` (in feature order) and the mean loss.

    Batches are grouped by bucket; the last batch of each bucket is padded with
    weight-0 rows, so each feature is counted exactly once."""
    out_logits = None
    loss_sum = count = 0.0
    for idx, width in T.eval_plan(enc, setup.cfg.data, batch_size):
        batch = T.take(enc, idx, width, batch_size)
        out = setup.eval_step(setup.state, to_device(setup.mesh, batch))
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


def _qa_spans(cfg: Config, enc: T.Encoded, logits: np.ndarray):
    """Best (start char, end char, score) per row over all of its windows."""
    best = [(0, 0, -math.inf)] * enc.n_rows
    k, max_len = 20, cfg.data.max_answer_tokens
    for f in range(len(enc)):
        off = enc.extra["offsets"][f]
        ctx = np.array([o is not None for o in off] + [False] * (logits.shape[1] - len(off)))
        st = np.where(ctx, logits[f, :, 0], -np.inf)
        en = np.where(ctx, logits[f, :, 1], -np.inf)
        ex = int(enc.example_of[f])
        for i in np.argsort(-st)[:k]:
            for j in np.argsort(-en)[:k]:
                if not (ctx[i] and ctx[j]) or j < i or j - i + 1 > max_len:
                    continue
                s = float(st[i] + en[j])
                if s > best[ex][2]:
                    best[ex] = (off[i][0], off[j][1], s)
    return best


def decode(cfg: Config, enc: T.Encoded, logits: np.ndarray) -> list[dict]:
    """Per-row predictions: label + probabilities, score, labels, tags or answer span."""
    kind, labels = cfg.task.kind, cfg.data.labels
    rows = []
    if kind == "classification":
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        for p in probs:
            rows.append({"label": labels[int(p.argmax())],
                         "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}})
    elif kind == "regression":
        rows = [{"score": float(v[0])} for v in logits]
    elif kind == "multilabel":
        probs = 1 / (1 + np.exp(-logits))
        for p in probs:
            rows.append({"labels": [n for n, v in zip(labels, p) if v > 0.5],
                         "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}})
    elif kind == "token_classification":
        pred = logits.argmax(-1)
        fill = "O" if "O" in labels else labels[0]
        for i, (words, first) in enumerate(zip(enc.extra["words"], enc.extra["first_token"])):
            tags = [labels[int(pred[i, j])] for j in first]
            rows.append({"tokens": words, "tags": tags + [fill] * (len(words) - len(tags))})
    elif kind == "qa":
        for (a, b, s), ctx in zip(_qa_spans(cfg, enc, logits), enc.extra["contexts"]):
            rows.append({"answer": ctx[a:b], "start": a, "end": b, "score": s})
    return rows


def score(cfg: Config, enc: T.Encoded, logits: np.ndarray, preds: list[dict] | None = None) -> dict:
    kind = cfg.task.kind
    if kind == "classification":
        return E.classification_scores(enc.arrays["labels"], logits.argmax(-1), num_labels(cfg))
    if kind == "regression":
        return E.regression_scores(enc.arrays["labels"], logits[:, 0])
    if kind == "multilabel":
        return E.multilabel_scores(enc.arrays["labels"], logits > 0)
    preds = preds if preds is not None else decode(cfg, enc, logits)
    if kind == "token_classification":
        labels = cfg.data.labels
        gold = [[labels[t] for t in row] for row in enc.extra["gold"]]
        return E.entity_scores(gold, [p["tags"] for p in preds])
    if kind == "qa":
        golds = [[t for _, _, t in a] for a in enc.extra["answers"]]
        return E.squad_scores([p["answer"] for p in preds], golds)
    raise ConfigError(f"task.kind={kind!r} has no metrics")


def evaluate(setup: Setup, enc: T.Encoded, batch_size: int) -> dict:
    t = time.perf_counter()
    logits, base = run_model(setup, enc, batch_size)
    out = {**base, **score(setup.cfg, enc, logits)}
    out["eval_s"] = round(time.perf_counter() - t, 2)
    return out


def encode_split(cfg: Config, rows: list[Row], tok, with_labels: bool = True) -> T.Encoded:
    enc = T.encode(rows, cfg, tok, cfg.data.labels, with_labels=with_labels)
    if with_labels and cfg.task.kind == "token_classification":
        # Word-level gold tags (all words, also those cut by truncation) for entity F1.
        lm = T.LabelMap(cfg.data.labels, cfg.data.label_field)
        enc.extra["gold"] = [[lm(t, r.where) for t in r.data[cfg.data.label_field]] for r in rows]
    return enc


# ---------------------------------------------------------------- training


def _weights():
    try:
        import jtl.weights as W
        return W
    except ImportError:
        return None


def prepare(cfg: Config):
    """(cfg with resolved labels/model, tokenizer, {split: rows}) for a fine-tuning run."""
    if cfg.task.kind in ("mlm", "clm"):
        raise ConfigError(f"task.kind={cfg.task.kind!r} is pretraining: use jtl.pretrain")
    if not cfg.data.train:
        raise ConfigError("data.train is required (file, folder, glob or HF dataset name)")
    W = _weights()
    if cfg.model.init_from and W is not None and hasattr(W, "resolve_config"):
        cfg = W.resolve_config(cfg)
    rows = {s: read_split(cfg, s) for s in SPLITS}
    labels = T.infer_labels(rows["train"], cfg)
    if labels is not None and labels != cfg.data.labels:
        log.info("labels (%d): %s", len(labels), ", ".join(labels[:20]))
        cfg = cfg.replace(**{"data.labels": list(labels)})
    if labels is not None and len(labels) < 2 and cfg.task.kind == "classification":
        raise DataError(f"{cfg.data.train}: only one label ({labels}) in field {cfg.data.label_field!r}")
    if cfg.task.class_weights and len(cfg.task.class_weights) != num_labels(cfg):
        raise ConfigError(f"task.class_weights has {len(cfg.task.class_weights)} values for "
                          f"{num_labels(cfg)} labels")
    texts = _texts_for_tokenizer(rows["train"], cfg) if not (cfg.data.tokenizer or cfg.model.init_from) \
        else None
    tok = get_tokenizer(cfg, texts, cfg.out_dir)
    return cfg, tok, rows


def finetune(cfg: Config, load_params=None, on_step=None) -> dict:
    """Train ``cfg`` (a fine-tuning task); returns the summary also written to summary.json.

    ``on_step(step, guard)`` is called after each step (tests and callbacks:
    ``guard.request()`` stops the run at this step as SIGTERM would)."""
    t_start = time.perf_counter()
    out_dir = cfg.out_dir
    cfg, tok, rows = prepare(cfg)
    W = _weights()
    if load_params is None and cfg.model.init_from and W is not None:
        load_params = W.params_loader(cfg)
    elif cfg.model.init_from and W is None:
        raise ConfigError("model.init_from is set but jtl.weights is not available")
    mesh = S.make_mesh(cfg.mesh)
    save_run_files(cfg, out_dir)
    if rows["test"] is not None and not _has_labels(rows["test"], cfg):
        log.info("%s: unlabelled test split (label -1): not scored", cfg.data.test)
        rows["test"] = None
    enc = {s: encode_split(cfg, r, tok) for s, r in rows.items() if r is not None}
    for s, e in enc.items():
        if e.truncated:
            log.warning("%s: %d of %d rows longer than data.seq_len=%d (%s)", s, e.truncated, e.n_rows,
                        cfg.data.seq_len, "split into windows" if cfg.task.kind == "qa" else "truncated")
    buckets = C.bucket_lengths(cfg.data)
    B = cfg.train.batch_size
    per_epoch = T.batches_per_epoch(enc["train"].lengths, buckets, B)
    total = cfg.train.steps or max(1, int(round(cfg.train.epochs * per_epoch)))
    spec = TaskSpec(num_labels=num_labels(cfg))
    if cfg.task.kind == "token_classification" and cfg.task.token_weighting == "equal":
        labelled = (enc["train"].arrays["labels"] >= 0).sum(1)
        spec = dataclasses.replace(spec, label_tokens_per_row=max(float(labelled.mean()), 1.0))
    metric = metric_name(cfg)
    allowed = E.BY_KIND[cfg.task.kind] if cfg.task.kind != "classification" or num_labels(cfg) == 2 \
        else tuple(m for m in E.BY_KIND["classification"] if m != "f1")
    if metric not in allowed:
        raise ConfigError(f"task.metric={metric!r} is not computed for task.kind={cfg.task.kind!r} "
                          f"({num_labels(cfg)} labels); use one of {', '.join(allowed)}")
    mode = "min" if metric in E.LOWER_IS_BETTER else cfg.task.metric_mode
    log.info("%s: %d train rows (%d features), %d batches/epoch, %d steps, buckets %s, metric %s",
             cfg.task.kind, enc["train"].n_rows, len(enc["train"]), per_epoch, total, buckets, metric)

    t_build = time.perf_counter()
    setup = build(cfg, spec, mesh, total, load_params)
    start, loop = _resume(cfg, setup, out_dir / "checkpoints")
    mngr = ckpt.manager(out_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        best_metric=metric if cfg.checkpoint.keep_best else None, best_mode=mode)
    writer = MetricWriter(out_dir)
    widths = [w for _, w in T.epoch_plan(enc["train"].lengths, buckets, B, 0, False)]
    logger = StepLogger(cfg, setup, writer, train_flops_per_step(cfg.model, B, float(np.mean(widths)),
                                                                  cfg.task.kind), total, start)
    eval_bs = _eval_batch_size(cfg, mesh)
    val = enc.get("validation")
    history, best, best_step, bad_evals = (loop.get("history", []), loop.get("best"), loop.get("best_step"),
                                           loop.get("bad_evals", 0))
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    stopped_early = False
    it = T.train_batches(enc["train"], cfg.data, B, cfg.train.seed + cfg.data.seed, start)
    real_total = padded_total = 0
    eval_s = 0.0  # time spent evaluating/saving inside the loop (not training)
    t0 = time.perf_counter()
    state = setup.state
    step = start

    def loop_meta():  # saved with each checkpoint: a resumed run keeps its best and patience
        return {"loop": {"history": history, "best": best, "best_step": best_step, "bad_evals": bad_evals}}

    with preemption.Guard() as guard:
        for step in range(start + 1, total + 1):
            host = next(it)
            real = int(host["segment_ids"].sum())
            padded = host["segment_ids"].size
            real_total += real
            padded_total += padded
            state, m = setup.train_step(state, to_device(mesh, host))
            logger.push(step, m, real, padded)
            if on_step is not None:
                on_step(step, guard)
            if guard.stop_requested(step) and step < total:  # SIGTERM: checkpoint this step, exit 75
                ckpt.save(mngr, step, state, cfg.to_dict(), meta=loop_meta(), force=True)
                ckpt.wait(mngr)
                logger.flush()
                mngr.close()
                err = preemption.Preempted(step, str(out_dir / "checkpoints"))
                log.warning("jtl: %s; exiting with code %d", err, preemption.EXIT_PREEMPTED)
                raise err
            is_eval = step == total or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
            if not is_eval:
                continue
            setup.state = state
            t_eval = time.perf_counter()
            if val is None:
                best_step = step
                ckpt.save(mngr, step, state, cfg.to_dict(), metrics={metric: 0.0} if cfg.checkpoint.keep_best
                          else None, meta=loop_meta(), force=True)
                eval_s += time.perf_counter() - t_eval
                continue
            ev = evaluate(setup, val, eval_bs)
            writer.write(step, ev, "validation")
            history.append({"step": step, **ev})
            log.info("step %d validation: %s", step, " ".join(f"{k}={v:.4f}" for k, v in ev.items()
                                                              if isinstance(v, float)))
            improved = best is None or better(ev[metric], best)
            if improved:
                best, best_step, bad_evals = ev[metric], step, 0
            else:
                bad_evals += 1
            if improved or not cfg.checkpoint.keep_best:
                ckpt.save(mngr, step, state, cfg.to_dict(), metrics={metric: float(ev[metric])},
                          meta=loop_meta(), force=True)
            eval_s += time.perf_counter() - t_eval
            if cfg.train.patience and bad_evals >= cfg.train.patience:
                log.info("early stopping at step %d: no %s improvement in %d evaluations", step, metric,
                         bad_evals)
                stopped_early = True
                break
    logger.flush()
    train_wall = time.perf_counter() - t0 - eval_s
    setup.state = state
    mngr.wait_until_finished()
    if best_step is not None and best_step != step:
        setup.state, _, _ = ckpt.restore_state(mngr, best_step, setup.state)
    summary = {"task": cfg.task.kind, "metric": metric, "best_step": best_step, "best_metric": best,
               "steps_run": step, "total_steps": total, "stopped_early": stopped_early,
               "train_rows": enc["train"].n_rows,
               "truncated": {s: e.truncated for s, e in enc.items()},
               "train_wall_s": round(train_wall, 2), "eval_in_loop_s": round(eval_s, 2),
               "setup_s": round(t0 - t_build, 2),
               "real_tokens_per_s": real_total / max(train_wall, 1e-9),
               "padded_tokens_per_s": padded_total / max(train_wall, 1e-9),
               "padding_fraction": 1 - real_total / max(padded_total, 1),
               **{f"train_{k}": v for k, v in logger.last.items()}}
    final = {}
    if val is not None:
        done = [h for h in history if h["step"] == best_step]
        final["validation"] = done[0] if done else evaluate(setup, val, eval_bs)  # e.g. resumed at the end
    if "test" in enc:
        final["test"] = evaluate(setup, enc["test"], eval_bs)
        writer.write(best_step or step, final["test"], "test")
    summary["final"] = final
    summary["history"] = history
    summary["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    mngr.close()
    writer.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _resume(cfg: Config, setup: Setup, ckdir: Path) -> tuple[int, dict]:
    """Restore the newest usable checkpoint (the run's own, else checkpoint.resume_from;
    validated as for pretraining). Returns (start step, the loop's evaluation
    history/best/patience so far); the batch order needs no state (a function of the
    seed and the step)."""
    got = ckpt.resume_run(cfg.checkpoint, ckdir, setup.state, cfg.to_dict())
    if got is None:
        return 0, {}
    setup.state, _, step, meta, source = got
    loop = meta.get("loop", {})
    log.info("resumed from %s at step %d (best %s so far: %s at step %s)", source / str(step), step,
             metric_name(cfg), loop.get("best"), loop.get("best_step"))
    return step, loop


def _has_labels(rows: list[Row], cfg: Config) -> bool:
    """GLUE test splits carry label -1 (unlabelled): skip scoring them."""
    v = rows[0].data.get(cfg.data.label_field)
    return v is not None and v != -1


# ---------------------------------------------------------------- from a run directory


def load_run(run_dir: str | Path, config_path: str | None = None, overrides=()):
    """(cfg, tokenizer, Setup with the best parameters) of a finished fine-tuning run."""
    run = Path(run_dir)
    if config_path is not None and "=" in str(config_path) and not Path(config_path).is_file():
        overrides, config_path = [config_path, *overrides], None  # `jtl eval RUN key=value`
    if not (run / "config.yaml").exists() and config_path is None:
        raise ConfigError(f"{run}: no config.yaml (is this a jtl run directory?)")
    cfg = C.load(str(config_path or run / "config.yaml"), list(overrides))
    cfg = cfg.replace(**{"run_dir": str(run), "model.init_from": None})
    from jtl.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(run / "tokenizer"))
    step = None
    if (run / "summary.json").exists():
        step = json.loads((run / "summary.json").read_text()).get("best_step")
    mesh = S.make_mesh(cfg.mesh)
    setup = build(cfg, TaskSpec(num_labels=num_labels(cfg)), mesh, 1,
                  lambda abstract: ckpt.restore_params(run, _Concrete(abstract, mesh), step=step))
    return cfg, tok, setup


class _Concrete:
    """The abstract params (whose shardings name an AbstractMesh) with shardings on ``mesh``,
    in the ``flat_state()`` form restore_params reads."""

    def __init__(self, abstract, mesh):
        from jax.sharding import NamedSharding
        self.items = [(p, jax.ShapeDtypeStruct(v.shape, v.dtype,
                                               sharding=NamedSharding(mesh, v.sharding.spec)))
                      for p, v in abstract.flat_state()]

    def flat_state(self):
        return self.items


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
    cfg, tok, setup = load_run(run_dir, None, overrides)
    rows = read_rows(str(input_path), split="test", text_field=cfg.data.text_field,
                     hf_config=cfg.data.hf_config)
    bs = _eval_batch_size(cfg, setup.mesh)
    n = 0
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        for at in range(0, len(rows), chunk_rows):
            part = rows[at:at + chunk_rows]
            enc = encode_split(cfg, part, tok, with_labels=False)
            logits, _ = run_model(setup, enc, bs)
            for i, (r, p) in enumerate(zip(part, decode(cfg, enc, logits))):
                ids = {k: r.data[k] for k in ("id", "idx") if k in r.data}
                f.write(json.dumps({"row": at + i, **ids, **p}, ensure_ascii=False) + "\n")
                n += 1
    return n
