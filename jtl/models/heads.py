"""Task heads on top of the backbone, and ``Model`` = backbone + one head.

The head is the one ``task.kind``'s task names (``jtl.tasks.get(kind).head``):

* ``mlm``: BERT prediction head (dense + act + LN, decoder tied to the token
  embeddings) evaluated only at the masked positions it is given.
* ``clm``: next-token logits (tied or separate output matrix).
* ``sequence`` (classification, regression, multilabel): pooled [CLS] (BERT
  pooler, raw CLS or mean of tokens) -> dropout -> linear.
* ``token`` (token_classification): per-token linear.
* ``span`` (qa): per-token start/end logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jtl.config import ModelConfig
from jtl.models import layers as L
from jtl.models.transformer import Backbone
from jtl.sharding import constrain
from jtl.tasks import get as get_task


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, task: str = "mlm", num_labels: int = 0, *,
                 pooling: str = "pooler", rngs: nnx.Rngs):
        self.task, self.pooling = task, pooling
        self.head = head = get_task(task).head
        self.backbone = Backbone(cfg, rngs)
        dt = jnp.dtype(cfg.param_dtype)
        p = lambda shape, names, **kw: L.param(rngs, shape, names, std=cfg.init_std, dtype=dt, **kw)
        d = cfg.hidden
        if head == "mlm":
            self.mlm_w = p((d, d), ("norm", "embed"))
            self.mlm_b = p((d,), ("norm",), init="zeros")
            self.mlm_norm_scale = p((d,), ("norm",), init="ones")
            self.mlm_norm_bias = p((d,), ("norm",), init="zeros")
            self.mlm_out_b = p((cfg.vocab_size,), ("vocab",), init="zeros")
        if head in ("mlm", "clm") and not cfg.tie_embeddings:
            self.lm_w = p((cfg.vocab_size, d), ("vocab", "embed"))
        if head == "sequence" and pooling == "pooler":
            self.pooler_w = p((d, d), ("norm", "embed"))
            self.pooler_b = p((d,), ("norm",), init="zeros")
        if head in ("sequence", "token", "span"):
            n = 2 if head == "span" else num_labels
            if n <= 0:
                raise ValueError(f"task {task!r} needs num_labels > 0")
            self.cls_w = p((n, d), ("classes", "embed"))
            self.cls_b = p((n,), ("classes",), init="zeros")

    def output_matrix(self):
        return self.lm_w[...] if hasattr(self, "lm_w") else self.backbone.embed.tokens[...]

    def __call__(self, cfg: ModelConfig, batch: dict, rng=None, head_dropout: float | None = None):
        """Returns the head's output: logits (or scores) whose shape depends on the task."""
        r_body, r_head = jax.random.split(rng) if rng is not None else (None, None)
        h = self.backbone(cfg, batch["input_ids"], batch.get("segment_ids"), batch.get("positions"),
                          batch.get("token_type_ids"), r_body)
        dt = h.dtype
        drop = cfg.dropout if head_dropout is None else head_dropout
        if self.head == "mlm":
            # Only the masked positions reach the vocab projection: [B, P, D].
            h = jnp.take_along_axis(h, batch["mlm_positions"][..., None], axis=1)
            h = L.activation(cfg.activation)(L.dense(h, self.mlm_w[...], self.mlm_b[...], dt))
            h = L.layer_norm(h, self.mlm_norm_scale[...], self.mlm_norm_bias[...], cfg.norm_eps)
            logits = L.dense(h, self.output_matrix(), self.mlm_out_b[...], dt)
            return constrain(logits, ("batch", "length", "vocab"))
        if self.head == "clm":
            return constrain(L.dense(h, self.output_matrix(), None, dt), ("batch", "length", "vocab"))
        if self.head == "sequence":
            pooled = pool(h, batch.get("segment_ids"), self.pooling)
            if self.pooling == "pooler":
                pooled = jnp.tanh(L.dense(pooled, self.pooler_w[...], self.pooler_b[...], dt))
            pooled = L.dropout(pooled, drop, r_head)
            return L.dense(pooled, self.cls_w[...], self.cls_b[...], dt)
        h = L.dropout(h, drop, r_head)
        return L.dense(h, self.cls_w[...], self.cls_b[...], dt)  # [B, S, labels or 2]


def pool(h_BSD, segment_ids, how: str):
    if how in ("cls", "pooler"):
        return h_BSD[:, 0]
    mask = (segment_ids > 0)[..., None].astype(h_BSD.dtype)
    return (h_BSD * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
