"""Sequence classification (SST-2, MRPC, ...): pooled head, cross-entropy, accuracy/F1/MCC."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jtl import evaluation as E
from jtl.data import tasks as T
from jtl.tasks.base import Task, register, xent


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


class Classification(Task):
    name, head, labels_from_data = "classification", "sequence", "value"
    metrics = ("accuracy", "f1", "macro_f1", "mcc", "loss")
    default_metric = "accuracy"

    def allowed_metrics(self, cfg):
        # Binary F1 needs a positive class: only with two labels.
        return self.metrics if self.num_labels(cfg) == 2 else tuple(m for m in self.metrics if m != "f1")

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["example_weights"]  # 0 for padding rows added to fill a batch
        loss = xent(logits, batch["labels"], cfg.task.label_smoothing)
        if cfg.task.class_weights:
            loss = loss * jnp.asarray(cfg.task.class_weights)[batch["labels"]]
        correct = ((logits.argmax(-1) == batch["labels"]) * w).sum()  # the training accuracy
        return (loss * w).sum(), w.sum(), {"logits": logits, "correct": correct}

    def encode(self, rows, cfg, tok, labels, with_labels=True):
        enc = T.encode_texts(rows, cfg, tok)
        lab = np.zeros(len(rows), np.int32)
        if with_labels:
            lm = T.LabelMap(labels, cfg.data.label_field)
            lab[:] = [lm(T.field(r, cfg.data.label_field), r.where) for r in rows]
        enc.arrays["labels"] = lab
        return enc

    def decode(self, cfg, enc, logits):
        labels = cfg.data.labels
        return [{"label": labels[int(p.argmax())],
                 "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}}
                for p in softmax(logits)]

    def score(self, cfg, enc, logits, preds=None):
        return E.classification_scores(enc.arrays["labels"], logits.argmax(-1), self.num_labels(cfg))


register(Classification())
