"""Causal-LM pretraining (GPT-2 / Llama): next-token loss on packed rows; SFT: the same
loss on response tokens only."""
from __future__ import annotations

from jtl.tasks.base import Task, register, top1_correct, xent


class CLM(Task):
    name, head, pretraining, causal = "clm", "clm", True, True
    metrics = ("loss", "perplexity", "accuracy")
    lower_is_better = ("loss", "perplexity")

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["loss_weights"]
        loss = xent(logits, batch["targets"]) * w
        return loss.sum(), w.sum(), {"correct": (top1_correct(logits, batch["targets"]) * w).sum()}


register(CLM())


class SFT(CLM):
    """Instruction tuning: the CLM loss on packed prompt/response examples whose
    ``loss_weights`` are 1 only on response tokens (``jtl.data.sft``). Its validation may
    also score generated completions (``task.generate_metric``, ``jtl.pretrain``)."""
    name = "sft"

    def allowed_metrics(self, cfg):
        return self.metrics + ((cfg.task.generate_metric,) if cfg.task.generate_metric else ())


register(SFT())
