"""Multi-label classification: pooled head, one sigmoid per label, micro/macro F1."""
from __future__ import annotations

import numpy as np
import optax
import jax.numpy as jnp

from jtl import evaluation as E
from jtl.data import tasks as T
from jtl.data.sources import DataError
from jtl.tasks.base import Task, register


class Multilabel(Task):
    name, head, labels_from_data = "multilabel", "sequence", "list"
    metrics = ("micro_f1", "f1", "macro_f1", "accuracy", "loss")
    default_metric = "micro_f1"

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["example_weights"]
        loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["labels"]).mean(-1)
        return (loss * w).sum(), w.sum(), {"logits": logits}

    def encode(self, rows, cfg, tok, labels, with_labels=True):
        enc = T.encode_texts(rows, cfg, tok)
        name = cfg.data.label_field
        lab = np.zeros((len(rows), len(labels)), np.float32)
        if with_labels:
            lm = T.LabelMap(labels, name)
            for i, r in enumerate(rows):
                v = T.field(r, name)
                if not isinstance(v, list):
                    raise DataError(f"{r.where}: field {name!r} must be a list of labels "
                                    f"for multilabel, got {v!r}")
                for x in v:
                    lab[i, lm(x, r.where)] = 1.0
        enc.arrays["labels"] = lab
        return enc

    def decode(self, cfg, enc, logits):
        labels = cfg.data.labels
        return [{"labels": [n for n, v in zip(labels, p) if v > 0.5],
                 "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}}
                for p in 1 / (1 + np.exp(-logits))]

    def score(self, cfg, enc, logits, preds=None):
        return E.multilabel_scores(enc.arrays["labels"], logits > 0)


register(Multilabel())
