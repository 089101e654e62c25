"""Optax chains: AdamW, warmup + decay schedules, weight-decay masks, and the filter of
trainable parameters (``optim.freeze``).

Frozen parameters are left out of the optimizer altogether (``trainable_filter`` is
the ``wrt`` of ``nnx.Optimizer`` and of the train step's gradient): no gradient, no
Adam moments, no weight decay, and the global clip norm counts only what trains."""
from __future__ import annotations

import jax
import optax

from jtl.config import OptimConfig

# Parameters that get weight decay: matrices and embedding tables. Biases and
# norm scales do not (their names end in _b, _bias, _scale).
DECAYED_NAMES = ("tokens", "positions", "types")


def path_names(path) -> tuple[str, ...]:
    """Names along a pytree path, skipping the ``value`` attribute of Variables."""
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", None))
        if isinstance(name, str) and name != "value":
            out.append(name)
        elif isinstance(name, int):
            out.append(str(name))
    return tuple(out)


def tree_finite(tree):
    """Scalar bool: every float array in ``tree`` is finite (traceable inside jit)."""
    import jax.numpy as jnp
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def is_decayed(names: tuple[str, ...]) -> bool:
    last = names[-1] if names else ""
    return last.endswith("_w") or last in DECAYED_NAMES


def is_frozen(names: tuple[str, ...], prefixes: tuple[str, ...]) -> bool:
    dotted = ".".join(names)
    return any(dotted == p or dotted.startswith(p + ".") or f".{p}." in f".{dotted}."
               for p in prefixes)


def trainable_filter(cfg: OptimConfig):
    """nnx filter ``(path, value) -> bool``: a parameter that ``cfg.freeze`` does not name."""
    from flax import nnx
    prefixes = tuple(cfg.freeze)

    def trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and not (
            prefixes and is_frozen(tuple(str(k) for k in path), prefixes))
    return trainable


def layer_scale(names: tuple[str, ...], shape: tuple[int, ...], decay: float, n_layers: int):
    """The lr multiplier of one parameter under layer-wise decay: a [layers, 1, ...]
    column for the stacked layer parameters (axis 0 = layer i, factor decay**(L - i)),
    decay**(L + 1) for the embeddings, 1 for everything else (heads, final norm)."""
    import jax.numpy as jnp
    if "layers" in names and shape:
        col = decay ** (shape[0] - jnp.arange(shape[0], dtype=jnp.float32))
        return col.reshape((shape[0],) + (1,) * (len(shape) - 1))
    if "embed" in names:
        return decay ** (n_layers + 1)
    return 1.0


def scale_by_layer(decay: float) -> optax.GradientTransformation:
    """Multiply each update by its layer's lr factor (``OptimConfig.layer_decay``)."""

    def update(updates, state, params=None):
        leaves = jax.tree_util.tree_leaves_with_path(updates)
        n = max((x.shape[0] for p, x in leaves if "layers" in path_names(p) and x.ndim), default=0)
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u * layer_scale(path_names(p), u.shape, decay, n), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    total_steps = max(int(total_steps), 1)
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    else:
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_tx(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    sched = schedule(cfg, total_steps)

    def decay_mask(tree):
        return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(path_names(p)), tree)

    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.layer_decay != 1.0:
        parts.append(scale_by_layer(cfg.layer_decay))
    tx = optax.chain(*parts)
    return tx
