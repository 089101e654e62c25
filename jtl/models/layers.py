"""Shared transformer pieces as pure functions over arrays.

Weights are stored [out, in] (PyTorch/HF layout) and matmuls contract the last
axis of both operands: this matched PyTorch speed on CPU and makes HF import a
reshape, not a transpose. Norms and softmax run in float32 whatever the
compute dtype.
"""
from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -1e9


def threefry_unrolled_on_cpu(on: bool = True) -> bool:
    """Lower jax's threefry2x32 hash (dropout and MLM-masking bits) on CPU as the
    unrolled 20 rounds that every other backend gets, instead of jax's CPU default, a
    rolled 5-iteration loop whose every iteration is a separate pass over the whole
    [batch, seq, hidden] bit array. Same hash, same bits; the MiniLM-L6 train step ran
    1.26x faster on our CPU (benchmarks/results/cpu/variants-threefry), at about 4 s
    more compile time. Process-wide, for programs lowered afterwards; on at import
    unless JTL_THREEFRY_ROLLED=1. False where this jax has no such lowering to swap."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as tf
        rule = tf._threefry2x32_lowering_rule if on else tf._threefry2x32_cpu_lowering_rule
        mlir.register_lowering(tf.threefry2x32_p, rule, platform="cpu", inline=not on)
    except (ImportError, AttributeError) as e:  # jax internals moved: keep jax's default
        logging.getLogger("jtl").debug("threefry CPU lowering left as is: %s", e)
        return False
    return True


if os.environ.get("JTL_THREEFRY_ROLLED", "0").lower() in ("0", "false", "no", ""):
    threefry_unrolled_on_cpu(True)


def param(rngs: nnx.Rngs, shape: tuple, names: tuple, *, init: str = "normal", std: float = 0.02,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter annotated with logical axis names (sharded on creation under a mesh)."""
    assert len(shape) == len(names), (shape, names)
    if init == "normal":
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=names)


def dense(x, w, b=None, dtype=None):
    """x[..., in] @ w[out..., in] -> [..., out...]; w may have several out axes."""
    dtype = dtype or x.dtype
    y = jax.lax.dot_general(x.astype(dtype), w.astype(dtype),
                            (((x.ndim - 1,), (w.ndim - 1,)), ((), ())))
    return y if b is None else y + b.astype(dtype)


@jax.named_scope("norm")
def layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


@jax.named_scope("norm")
def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def norm(x, p: dict, prefix: str, eps: float):
    if prefix + "_bias" in p:
        return layer_norm(x, p[prefix + "_scale"], p[prefix + "_bias"], eps)
    return rms_norm(x, p[prefix + "_scale"], eps)


_SQRT_HALF = math.sqrt(0.5)


def gelu(x):
    """Exact (erf) GELU, as BERT and HF's "gelu". Written with erf: jax.nn.gelu's erfc
    form computes the same function (|diff| < 2e-6) but the MiniLM train step ran 1.035x
    faster with erf on XLA:CPU (benchmarks/results/cpu/variants-step-intel)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def activation(name: str):
    return {"gelu": lambda x: gelu(x),  # looked up per call: step_variants.py swaps ``gelu``
            "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "silu": jax.nn.silu, "relu": jax.nn.relu}[name]


def dropout(x, rate: float, rng):
    """Inverted dropout; ``rng=None`` means deterministic (eval). One 32-bit random word
    per element (``jax.random.bernoulli``): masks packed from 8-bit draws, a quarter of the
    hashing, made the MiniLM train step no faster on CPU, since the mask fuses into the
    softmax and residual passes whose memory traffic dominates
    (benchmarks/results/cpu/variants-step-intel, ``jtl.dropout=bits8``)."""
    if rng is None or rate == 0.0:
        return x
    with jax.named_scope("dropout"):  # scope names label the profile (benchmarks/profile_step.py)
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_mask(segment_ids, causal: bool):
    """[B, S] segment ids (0 = padding) -> [B, 1, S, S] bool: who may attend to whom.

    Tokens attend only within their own segment, so packed documents never see
    each other; padding keys are never attended.
    """
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = (seg_q == seg_k) & (seg_k > 0)
    if causal:
        s = segment_ids.shape[1]
        mask &= jnp.tril(jnp.ones((s, s), bool))[None]
    return mask[:, None]


def rope(x, positions, theta: float):
    """Rotary embedding, HF/Llama "rotate half" layout. x: [B, S, H, D], positions [B, S]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, *, dropout_rate=0.0, rng=None):
    """Softmax attention with grouped-query support (H query heads share K kv heads)."""
    with jax.named_scope("attention"):
        return _attention(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, dropout_rate, rng)


def _attention(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, dropout_rate, rng):
    b, s, h, d = q_BSHD.shape
    kv = k_BSKD.shape[2]
    if kv == h:
        # Plain multi-head attention without the size-1 group axis: same math,
        # but XLA:CPU then copies/transposes q, k, v and probs less (MiniLM
        # train step: 0.7 GiB fewer copy bytes, -4.5% bytes accessed).
        logits = jnp.einsum("bqhd,bthd->bhqt", q_BSHD, k_BSKD) / math.sqrt(d)
        logits = jnp.where(mask_B1SS, logits.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
        probs = dropout(probs, dropout_rate, rng)
        return jnp.einsum("bhqt,bthd->bqhd", probs, v_BSKD)
    q = q_BSHD.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", q, k_BSKD) / math.sqrt(d)
    logits = jnp.where(mask_B1SS[:, :, None], logits.astype(jnp.float32), NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
    probs = dropout(probs, dropout_rate, rng)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v_BSKD)
    return out.reshape(b, s, h, d)


# ------------------------------------------------------------------ KV cache (generation)
# A cache is one fixed-size buffer per layer, [B, kv_heads, T, head_dim], shared slot
# numbering across the batch: prompts are left-padded, so row b's real tokens start at
# slot ``start[b]`` and every row writes its next token at the same slot. Heads before
# slots is the layout both attention products read without a transposed copy of the
# cache (XLA:CPU made one per layer and token from [B, T, K, D]). Training never builds
# a cache; these helpers only run when ``transformer.block`` is given one.


def cache_mask(start_B, first_slot, s: int, t: int):
    """[B, 1, S, T] bool for S queries at cache slots ``first_slot``.. over T slots.

    A query sees keys at slots <= its own (causal) that are not left padding
    (slot >= ``start[b]``); slots not written yet are always in its future."""
    q_slot = first_slot + jnp.arange(s)
    k_slot = jnp.arange(t)
    mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & (k_slot[None, None, :] >= start_B[:, None, None])
    return mask[:, None]


def write_cache(cache_BKTD, new_BSKD, index):
    """The cache with ``new`` written at slots index..index+S-1 (a fixed-shape update)."""
    new = new_BSKD.transpose(0, 2, 1, 3).astype(cache_BKTD.dtype)
    return jax.lax.dynamic_update_slice_in_dim(cache_BKTD, new, index, axis=2)


def cached_attention(q_BSHD, k_BKTD, v_BKTD, mask_B1ST):
    """``attention`` (no dropout) of S queries over a cache's T slots."""
    with jax.named_scope("attention"):
        b, s, h, d = q_BSHD.shape
        kv = k_BKTD.shape[1]
        q = q_BSHD.reshape(b, s, kv, h // kv, d)
        logits = jnp.einsum("bskgd,bktd->bkgst", q, k_BKTD) / math.sqrt(d)
        logits = jnp.where(mask_B1ST[:, :, None], logits.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_BKTD.dtype)
        return jnp.einsum("bkgst,bktd->bskgd", probs, v_BKTD).reshape(b, s, h, d)
