"""What every task is: the interface the run loop, the model head and the CLI use.

A task is one objective (``task.kind``). Its file under ``jtl/tasks/`` defines a
``Task`` subclass and registers it; nothing else in jtl branches on the kind.
A task says

* ``head``: which head ``jtl.models.Model`` puts on the backbone
  (``mlm``, ``clm``, ``sequence`` = pooled, ``token`` = per token, ``span`` = start/end);
* ``encode``: labelled rows -> padded arrays (``jtl.data.tasks.Encoded``);
* ``prepare_batch`` / ``loss``: the per-step input corruption and the loss, as sums
  (not means) so that gradient accumulation divides once by the total count;
* ``decode`` / ``score``: head outputs -> per-row predictions and metrics;
* ``metrics`` / ``default_metric``: what its evaluation reports and selects on.

Adding a task (SFT, seq2seq, distillation) means adding a file with a subclass
and one ``register`` call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from jtl.config import Config, ConfigError


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


def xent(logits, labels, smoothing: float = 0.0):
    with jax.named_scope("loss"):
        return _xent(logits.astype(jnp.float32), labels, smoothing)


def _xent(logits, labels, smoothing):
    if smoothing:
        onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, onehot)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top1_correct(logits, labels):
    """1.0 where the label's logit is the largest (argmax == label but for exact ties), else
    0.0. A max over the classes and one gather: XLA:CPU's argmax (a two-output reduce)
    took 35 ms of the MiniLM MLM train step over its 30k-word vocabulary."""
    with jax.named_scope("loss"):
        own = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return (own >= logits.max(-1)).astype(jnp.float32)


def split_rng(rng):
    """(masking rng, model rng); both None at evaluation."""
    return jax.random.split(rng) if rng is not None else (None, None)


class Task:
    name: str = ""
    head: str = ""  # mlm | clm | sequence | token | span
    pretraining: bool = False  # an LM objective on raw text (jtl.pretrain)
    causal: bool | None = None  # needs a decoder (True) / an encoder (False) / either (None)
    labels_from_data: str | None = None  # "value" | "list": how data.labels are inferred
    metrics: tuple[str, ...] = ("loss",)
    default_metric: str = "loss"
    lower_is_better: tuple[str, ...] = ("loss", "mse")

    # ---- static facts
    def num_labels(self, cfg: Config) -> int:
        return len(cfg.data.labels or ())

    def allowed_metrics(self, cfg: Config) -> tuple[str, ...]:
        return self.metrics

    def metric(self, cfg: Config) -> str:
        """The selection metric (task.metric or this task's default), checked."""
        name = cfg.task.metric or self.default_metric
        allowed = self.allowed_metrics(cfg)
        if name not in allowed:
            raise ConfigError(f"task.metric={name!r} is not computed for task.kind={self.name!r} "
                              f"({self.num_labels(cfg)} labels); use one of {', '.join(allowed)}")
        return name

    def metric_mode(self, cfg: Config, metric: str) -> str:
        return "min" if metric in self.lower_is_better else cfg.task.metric_mode

    # ---- the step (traced inside jit)
    def prepare_batch(self, cfg: Config, spec: TaskSpec, batch: dict, rng) -> dict:
        """Per-step input corruption on the whole batch, before any microbatch split."""
        return batch

    def loss(self, cfg: Config, spec: TaskSpec, model, batch: dict, rng):
        """(loss summed over examples/tokens, their count, extras such as logits/correct)."""
        raise NotImplementedError

    def head_logits(self, cfg: Config, model, batch: dict, rng):
        _, r_model = split_rng(rng)
        return model(cfg.model, batch, r_model, cfg.task.head_dropout)

    # ---- host side
    def encode(self, rows, cfg: Config, tok, labels, with_labels: bool = True):
        raise ConfigError(f"task.kind={self.name!r} does not encode labelled rows")

    def decode(self, cfg: Config, enc, logits) -> list[dict]:
        raise ConfigError(f"task.kind={self.name!r} has no predictions")

    def score(self, cfg: Config, enc, logits, preds: list[dict] | None = None) -> dict:
        raise ConfigError(f"task.kind={self.name!r} has no metrics")


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in REGISTRY:
        raise ValueError(f"task {task.name!r} is registered twice")
    REGISTRY[task.name] = task
    return task


def get(kind: str) -> Task:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"task.kind={kind!r}: unknown; expected one of {', '.join(REGISTRY)}") from None


def kinds(head: str | None = None, pretraining: bool | None = None) -> tuple[str, ...]:
    return tuple(n for n, t in REGISTRY.items()
                 if (head is None or t.head == head) and (pretraining is None or t.pretraining == pretraining))
