"""Tasks: one file per objective, one registry (see ``jtl.tasks.base``).

``get(cfg.task.kind)`` is the only way jtl learns what a kind means: its head,
how rows are encoded, its loss, predictions and metrics. Registered kinds:
mlm, clm (pretraining) and classification, regression, multilabel,
token_classification, qa (fine-tuning).
"""
from __future__ import annotations

from jtl.tasks.base import REGISTRY, Task, TaskSpec, get, kinds, mlm_max_predictions, register
from jtl.tasks import mlm, clm, classification, regression, multilabel, token_classification, qa  # noqa: F401,I001
from jtl.tasks.mlm import mask_tokens

__all__ = ["REGISTRY", "Task", "TaskSpec", "get", "kinds", "register", "mlm_max_predictions",
           "mask_tokens", "loss_and_outputs", "prepare_batch"]


def prepare_batch(cfg, spec: TaskSpec, batch: dict, rng) -> dict:
    """Per-step input corruption (MLM masking), done on the whole batch before any
    microbatch split (so accumulation sees exactly the big batch's masks)."""
    return get(cfg.task.kind).prepare_batch(cfg, spec, batch, rng)


def loss_and_outputs(cfg, spec: TaskSpec, model, batch: dict, rng):
    """Runs the model on ``batch``; returns (loss_sum, count, outputs dict)."""
    return get(cfg.task.kind).loss(cfg, spec, model, batch, rng)
