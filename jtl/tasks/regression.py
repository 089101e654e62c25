"""Sequence regression (STS-B): pooled head, squared error, Pearson/Spearman."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jtl import evaluation as E
from jtl.data import tasks as T
from jtl.data.sources import DataError
from jtl.tasks.base import Task, register


class Regression(Task):
    name, head = "regression", "sequence"
    metrics = ("pearson", "spearman", "mse", "loss")
    default_metric = "pearson"

    def num_labels(self, cfg):
        return 1

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["example_weights"]
        loss = jnp.square(logits[:, 0].astype(jnp.float32) - batch["labels"])
        return (loss * w).sum(), w.sum(), {"logits": logits}

    def encode(self, rows, cfg, tok, labels, with_labels=True):
        enc = T.encode_texts(rows, cfg, tok)
        lab = np.zeros(len(rows), np.float32)
        if with_labels:
            for i, r in enumerate(rows):
                v = T.field(r, cfg.data.label_field)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise DataError(f"{r.where}: field {cfg.data.label_field!r} must be a number for "
                                    f"regression, got {v!r}")
                lab[i] = v
        enc.arrays["labels"] = lab
        return enc

    def decode(self, cfg, enc, logits):
        return [{"score": float(v[0])} for v in logits]

    def score(self, cfg, enc, logits, preds=None):
        return E.regression_scores(enc.arrays["labels"], logits[:, 0])


register(Regression())
