"""Objectives: each returns (loss summed over its examples/tokens, their count, extras).

Sums, not means, so that gradient accumulation over microbatches divides once
by the total count and equals one big batch exactly, whatever the padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from jtl.config import Config


@dataclass(frozen=True)
class TaskSpec:
    """Static facts the step needs besides the config (from the tokenizer/data)."""
    mask_id: int = 0
    num_labels: int = 0
    max_predictions: int = 0  # MLM: predictions per row
    # Token classification with task.token_weighting="equal": the training set's mean
    # labelled tokens per row. The step's loss is then sum / (rows x this), so every
    # labelled token weighs the same whatever batch (length bucket) it lands in.
    label_tokens_per_row: float = 0.0


def mlm_max_predictions(seq_len: int, mask_prob: float) -> int:
    return max(1, math.ceil(seq_len * mask_prob))


def mask_tokens(rng, input_ids, eligible, mask_prob: float, max_predictions: int, mask_id: int,
                vocab_size: int):
    """BERT masking inside the step: 15% of eligible tokens; of those 80% [MASK], 10% random, 10% kept.

    Returns (corrupted ids [B, S], positions [B, P], labels [B, P], weights [B, P]).
    """
    r_pick, r_kind, r_tok = jax.random.split(rng, 3)
    b, s = input_ids.shape
    score = jnp.where(eligible, jax.random.uniform(r_pick, (b, s)), 2.0)
    _, positions = jax.lax.top_k(-score, max_predictions)  # lowest scores first
    n_eligible = eligible.sum(-1, keepdims=True)
    n_mask = jnp.clip(jnp.round(n_eligible * mask_prob), 1, max_predictions)
    rank = jnp.arange(max_predictions)[None]
    picked_ok = jnp.take_along_axis(eligible, positions, axis=1)
    weights = ((rank < n_mask) & picked_ok).astype(jnp.float32)
    labels = jnp.take_along_axis(input_ids, positions, axis=1)
    kind = jax.random.uniform(r_kind, labels.shape)
    random_ids = jax.random.randint(r_tok, labels.shape, 0, vocab_size)
    new = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, random_ids, labels))
    new = jnp.where(weights > 0, new, labels)
    rows = jnp.arange(b)[:, None]
    corrupted = input_ids.at[rows, positions].set(new.astype(input_ids.dtype))
    return corrupted, positions, labels, weights


def _xent(logits, labels, smoothing: float = 0.0):
    logits = logits.astype(jnp.float32)
    if smoothing:
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, onehot)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def prepare_batch(cfg: Config, spec: TaskSpec, batch: dict, rng) -> dict:
    """Per-step input corruption, done on the whole batch before any microbatch split
    (so accumulation over microbatches sees exactly the big batch's masks)."""
    if cfg.task.kind != "mlm" or "mlm_positions" in batch:
        return batch
    ids, pos, labels, w = mask_tokens(rng, batch["input_ids"], batch["mlm_eligible"], cfg.data.mask_prob,
                                      spec.max_predictions, spec.mask_id, cfg.model.vocab_size)
    return {**batch, "input_ids": ids, "mlm_positions": pos, "mlm_labels": labels, "mlm_weights": w}


def loss_and_outputs(cfg: Config, spec: TaskSpec, model, batch: dict, rng):
    """Runs the model on ``batch``; returns (loss_sum, count, outputs dict)."""
    kind, m = cfg.task.kind, cfg.model
    r_mask, r_model = jax.random.split(rng) if rng is not None else (None, None)
    if kind == "mlm":
        batch = prepare_batch(cfg, spec, batch, r_mask if r_mask is not None else jax.random.key(0))
        logits = model(m, batch, r_model)
        labels, w = batch["mlm_labels"], batch["mlm_weights"]
        loss = _xent(logits, labels) * w
        correct = (logits.argmax(-1) == labels) * w
        return loss.sum(), w.sum(), {"correct": correct.sum()}
    logits = model(m, batch, r_model, cfg.task.head_dropout)
    if kind == "clm":
        w = batch["loss_weights"]
        loss = _xent(logits, batch["targets"]) * w
        return loss.sum(), w.sum(), {"correct": ((logits.argmax(-1) == batch["targets"]) * w).sum()}
    w = batch["example_weights"]  # 0 for padding rows added to fill a batch
    if kind == "classification":
        loss = _xent(logits, batch["labels"], cfg.task.label_smoothing)
        if cfg.task.class_weights:
            loss = loss * jnp.asarray(cfg.task.class_weights)[batch["labels"]]
    elif kind == "regression":
        loss = jnp.square(logits[:, 0].astype(jnp.float32) - batch["labels"])
    elif kind == "multilabel":
        loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["labels"]).mean(-1)
    elif kind == "token_classification":
        tw = (batch["labels"] >= 0) * w[:, None]
        loss = _xent(logits, jnp.maximum(batch["labels"], 0), cfg.task.label_smoothing) * tw
        correct = ((logits.argmax(-1) == batch["labels"]) * tw).sum()
        count = w.sum() * spec.label_tokens_per_row if spec.label_tokens_per_row else tw.sum()
        return loss.sum(), count, {"logits": logits, "correct": correct, "scored": tw.sum()}
    elif kind == "qa":
        start, end = logits[..., 0], logits[..., 1]
        valid = batch["segment_ids"] > 0
        start = jnp.where(valid, start, -1e9)
        end = jnp.where(valid, end, -1e9)
        loss = 0.5 * (_xent(start, batch["start_positions"]) + _xent(end, batch["end_positions"]))
    else:
        raise ValueError(f"unknown task.kind {kind!r}")
    extra = {"logits": logits}
    if kind == "classification":  # reported as the training accuracy
        extra["correct"] = ((logits.argmax(-1) == batch["labels"]) * w).sum()
    return (loss * w).sum(), w.sum(), extra
