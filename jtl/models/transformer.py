"""One transformer backbone for the encoder and decoder families.

=========  ======  =========  ==========  ========  ===========
family     norms   placement  positions   MLP       attention
=========  ======  =========  ==========  ========  ===========
bert       LN      post-LN    learned     GELU      bidirectional, token types
roberta    LN      post-LN    learned+2   GELU      bidirectional
gpt2       LN      pre-LN     learned     GELU-tanh causal
llama      RMS     pre-LN     RoPE        SwiGLU    causal, grouped-query
=========  ======  =========  ==========  ========  ===========

Layer parameters are stacked along a leading ``layers`` axis so the same
weights can be scanned (one compiled layer, fast compile) or unrolled.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jtl.config import ModelConfig
from jtl.models import layers as L
from jtl.sharding import constrain

ACT = ("batch", "length", "embed")
CACHE = ("batch", "kv_heads", "length", "head_dim")  # generation's KV cache, one per layer


def is_pre_ln(cfg: ModelConfig) -> bool:
    return cfg.family in ("gpt2", "llama")


def has_bias(cfg: ModelConfig) -> bool:
    return cfg.family != "llama"


def is_gated(cfg: ModelConfig) -> bool:
    return cfg.family == "llama"


def uses_rope(cfg: ModelConfig) -> bool:
    return cfg.family == "llama"


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        p = lambda shape, names, **kw: L.param(rngs, shape, names, std=cfg.init_std,
                                               dtype=jnp.dtype(cfg.param_dtype), **kw)
        self.tokens = p((cfg.vocab_size, cfg.hidden), ("vocab", "embed"))
        if not uses_rope(cfg):
            self.positions = p((cfg.max_len, cfg.hidden), ("positions", "embed"))
        if cfg.type_vocab and not cfg.causal:
            self.types = p((cfg.type_vocab, cfg.hidden), ("type_vocab", "embed"))
        if not is_pre_ln(cfg):
            self.norm_scale = p((cfg.hidden,), ("norm",), init="ones")
            self.norm_bias = p((cfg.hidden,), ("norm",), init="zeros")

    def __call__(self, cfg: ModelConfig, input_ids, positions, token_type_ids, rng):
        dtype = jnp.dtype(cfg.dtype)
        # Gather from a table sharded on vocab only: XLA would otherwise replicate it.
        table = constrain(self.tokens[...], ("vocab", None))
        x = constrain(jnp.take(table, input_ids, axis=0), ACT).astype(dtype)
        if hasattr(self, "positions"):
            pos = constrain(self.positions[...], (None, None))
            x = x + constrain(jnp.take(pos, positions + cfg.position_offset, axis=0), ACT).astype(dtype)
        if hasattr(self, "types"):
            types = token_type_ids if token_type_ids is not None else jnp.zeros_like(input_ids)
            tt = constrain(self.types[...], (None, None))
            x = x + constrain(jnp.take(tt, types, axis=0), ACT).astype(dtype)
        if hasattr(self, "norm_scale"):
            x = L.layer_norm(x, self.norm_scale[...], self.norm_bias[...], cfg.norm_eps)
        return constrain(L.dropout(x, cfg.dropout, rng), ACT)


class Layers(nnx.Module):
    """All transformer blocks, each parameter stacked on a leading layers axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        n, d, h, kv, hd, f = (cfg.layers, cfg.hidden, cfg.heads, cfg.num_kv_heads,
                              cfg.dim_per_head, cfg.mlp)
        p = lambda shape, names, **kw: L.param(rngs, (n,) + shape, ("layers",) + names,
                                               std=cfg.init_std, dtype=jnp.dtype(cfg.param_dtype), **kw)
        self.q_w = p((h, hd, d), ("heads", "head_dim", "embed"))
        self.k_w = p((kv, hd, d), ("kv_heads", "head_dim", "embed"))
        self.v_w = p((kv, hd, d), ("kv_heads", "head_dim", "embed"))
        self.o_w = p((d, h, hd), ("embed", "heads", "head_dim"))
        self.up_w = p((f, d), ("mlp", "embed"))
        if is_gated(cfg):
            self.gate_w = p((f, d), ("mlp", "embed"))
        self.down_w = p((d, f), ("embed", "mlp"))
        if has_bias(cfg):
            self.q_b = p((h, hd), ("heads", "head_dim"), init="zeros")
            self.k_b = p((kv, hd), ("kv_heads", "head_dim"), init="zeros")
            self.v_b = p((kv, hd), ("kv_heads", "head_dim"), init="zeros")
            self.o_b = p((d,), ("norm",), init="zeros")
            self.up_b = p((f,), ("mlp",), init="zeros")
            self.down_b = p((d,), ("norm",), init="zeros")
        for name in ("attn_norm", "mlp_norm"):
            setattr(self, name + "_scale", p((d,), ("norm",), init="ones"))
            if cfg.family != "llama":
                setattr(self, name + "_bias", p((d,), ("norm",), init="zeros"))

    def arrays(self) -> dict:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def block(cfg: ModelConfig, p: dict, x, mask, positions, rng, kv_cache=None):
    """One transformer layer on x [B, S, D] with this layer's params ``p``.

    ``kv_cache`` (generation only): this layer's (k [B, K, T, D], v, index). The new keys
    and values are written at slots index..index+S-1, attention runs over all T slots
    (``mask`` is then [B, 1, S, T]) and the block returns (x, (k, v)), the updated cache.
    Generation also passes the projections flattened to matrices ([H*D, embed] for q_w,
    [embed, H*D] for o_w; see ``decode_layers``), so each is one plain matrix product."""
    dtype = x.dtype
    b, s = x.shape[:2]
    rngs = jax.random.split(rng, 4) if rng is not None else [None] * 4
    pre = is_pre_ln(cfg)
    h = L.norm(x, p, "attn_norm", cfg.norm_eps) if pre else x
    q, k, v = project_qkv(cfg, p, h, dtype)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    if uses_rope(cfg):
        q, k = L.rope(q, positions, cfg.rope_theta), L.rope(k, positions, cfg.rope_theta)
    if kv_cache is not None:
        cache_k, cache_v, index = kv_cache
        k, v = L.write_cache(cache_k, k, index), L.write_cache(cache_v, v, index)
        o = L.cached_attention(q, k, v, mask)
    else:
        o = L.attention(q, k, v, mask, dropout_rate=cfg.attention_dropout, rng=rngs[0])
    if p["o_w"].ndim == 2:  # generation's flattened [embed, H*D]
        o = L.dense(o.reshape(b, s, -1), p["o_w"], None, dtype)
    else:
        o = jax.lax.dot_general(o, p["o_w"].astype(dtype), (((2, 3), (1, 2)), ((), ())))
    if "o_b" in p:
        o = o + p["o_b"].astype(dtype)
    x = x + constrain(L.dropout(o, cfg.dropout, rngs[1]), ACT)
    if not pre:
        x = L.norm(x, p, "attn_norm", cfg.norm_eps)
    h = L.norm(x, p, "mlp_norm", cfg.norm_eps) if pre else x
    act = L.activation(cfg.activation)
    up = L.dense(h, p["up_w"], p.get("up_b"), dtype)
    up = act(L.dense(h, p["gate_w"], None, dtype)) * up if "gate_w" in p else act(up)
    up = constrain(up, ("batch", "length", "mlp"))
    down = L.dense(up, p["down_w"], p.get("down_b"), dtype)
    x = x + constrain(L.dropout(down, cfg.dropout, rngs[2]), ACT)
    if not pre:
        x = L.norm(x, p, "mlp_norm", cfg.norm_eps)
    return x if kv_cache is None else (x, (k, v))


def project_qkv(cfg: ModelConfig, p: dict, h, dtype):
    """h [B, S, embed] -> q [B, S, H, D], k and v [B, S, K, D]: three products. One product
    with the weights stacked was no faster on CPU (benchmarks/step_variants.py ``jtl.qkv``)."""
    b, s = h.shape[:2]
    return tuple(L.dense(h, p[n + "_w"], p.get(n + "_b"), dtype).reshape(b, s, -1, cfg.dim_per_head)
                 for n in "qkv")


REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embed = Embeddings(cfg, rngs)
        self.layers = Layers(cfg, rngs)
        if is_pre_ln(cfg):
            self.final_norm_scale = L.param(rngs, (cfg.hidden,), ("norm",), init="ones",
                                            dtype=jnp.dtype(cfg.param_dtype))
            if cfg.family != "llama":
                self.final_norm_bias = L.param(rngs, (cfg.hidden,), ("norm",), init="zeros",
                                               dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, cfg: ModelConfig, input_ids, segment_ids=None, positions=None,
                 token_type_ids=None, rng=None):
        """input_ids [B, S] -> hidden states [B, S, D].

        ``segment_ids`` (0 = padding) keep packed documents apart; ``positions``
        restart at 0 for each document. ``rng=None`` disables dropout.
        """
        if segment_ids is None:
            segment_ids = (input_ids != -1).astype(jnp.int32)  # everything is one segment
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        emb_rng, layer_rng = jax.random.split(rng) if rng is not None else (None, None)
        x = self.embed(cfg, input_ids, positions, token_type_ids, emb_rng)
        mask = L.attention_mask(segment_ids, cfg.causal)
        params = self.layers.arrays()

        def body(x, inputs):
            p, i = inputs
            r = jax.random.fold_in(layer_rng, i) if layer_rng is not None else None
            return block(cfg, p, x, mask, positions, r), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        idx = jnp.arange(cfg.layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (params, idx))
        else:
            for i in range(cfg.layers):
                x, _ = body(x, (jax.tree.map(lambda a: a[i], params), idx[i]))
        return self.final_norm(cfg, x)

    def final_norm(self, cfg: ModelConfig, x):
        if hasattr(self, "final_norm_scale"):
            bias = self.final_norm_bias[...] if hasattr(self, "final_norm_bias") else None
            x = (L.layer_norm(x, self.final_norm_scale[...], bias, cfg.norm_eps) if bias is not None
                 else L.rms_norm(x, self.final_norm_scale[...], cfg.norm_eps))
        return x

    def decode(self, cfg: ModelConfig, input_ids, positions, mask, cache: dict, index, layers=None):
        """Generation with a KV cache (no dropout): input_ids [B, S] at cache slots
        index..index+S-1 -> (hidden [B, S, D], cache with their keys and values written).

        ``cache`` holds ``k`` and ``v``, each a list of one [B, kv_heads, T, head_dim] buffer
        per layer; ``mask`` [B, 1, S, T] comes from ``layers.cache_mask``; ``positions``
        [B, S] count from each row's first real token. ``layers``: one param dict per layer
        (``decode_layers``; by default sliced from the stack here). The layers are unrolled
        whatever ``scan_layers`` says: with a buffer per layer and weights that are their
        own arrays, XLA updates the cache in place and reads every weight where it lies,
        where a stacked cache or a slice of the stacked weights is copied at every token."""
        x = self.embed(cfg, input_ids, positions, None, None)
        layers = decode_layers(cfg, self.layers.arrays()) if layers is None else layers
        ks, vs = [], []
        for p, ck, cv in zip(layers, cache["k"], cache["v"]):
            x, (ck, cv) = block(cfg, p, x, mask, positions, None, (ck, cv, index))
            ks.append(constrain(ck, CACHE))
            vs.append(constrain(cv, CACHE))
        return self.final_norm(cfg, x), {"k": ks, "v": vs}


def decode_layers(cfg: ModelConfig, stacked: dict) -> list[dict]:
    """The stacked layer params (``Layers.arrays()``) as one dict per layer, for generation,
    with the attention projections flattened to matrices (q/k/v_w [H*D, embed], o_w
    [embed, H*D]) that XLA:CPU multiplies as they lie (it transposed the [H, D, embed]
    form into a copy first)."""
    out = []
    for i in range(cfg.layers):
        p = {}
        for name, a in stacked.items():
            a = a[i]
            if name in ("q_w", "k_w", "v_w", "q_b", "k_b", "v_b"):
                a = a.reshape(-1, a.shape[-1]) if name.endswith("_w") else a.reshape(-1)
            elif name == "o_w":
                a = a.reshape(a.shape[0], -1)
            p[name] = a
        out.append(p)
    return out
