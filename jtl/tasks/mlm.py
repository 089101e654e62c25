"""Masked-LM pretraining (BERT): masking inside the step, loss at the masked positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jtl.tasks.base import Task, register, split_rng, top1_correct, xent


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


class MLM(Task):
    name, head, pretraining, causal = "mlm", "mlm", True, False
    metrics = ("loss", "perplexity", "accuracy")
    lower_is_better = ("loss", "perplexity")

    def prepare_batch(self, cfg, spec, batch, rng):
        if "mlm_positions" in batch:  # already masked (evaluation rows, or an earlier call)
            return batch
        ids, pos, labels, w = mask_tokens(rng, batch["input_ids"], batch["mlm_eligible"], cfg.data.mask_prob,
                                          spec.max_predictions, spec.mask_id, cfg.model.vocab_size)
        return {**batch, "input_ids": ids, "mlm_positions": pos, "mlm_labels": labels, "mlm_weights": w}

    def loss(self, cfg, spec, model, batch, rng):
        r_mask, r_model = split_rng(rng)
        batch = self.prepare_batch(cfg, spec, batch, r_mask if r_mask is not None else jax.random.key(0))
        logits = model(cfg.model, batch, r_model)
        labels, w = batch["mlm_labels"], batch["mlm_weights"]
        loss = xent(logits, labels) * w
        correct = top1_correct(logits, labels) * w
        return loss.sum(), w.sum(), {"correct": correct.sum()}


register(MLM())
