"""The train step's faster pieces compute what the plain versions do: 8-bit dropout masks,
erf GELU, the stacked q/k/v product and the max-based training accuracy
(benchmarks/step_variants.py times each against the plain one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.models import layers as L
from jtl.models import transformer as T
from jtl.tasks.base import top1_correct

from helpers import tiny_cfg


@pytest.mark.parametrize("rate, want", [(0.1, 26 / 256), (0.3, 77 / 256), (0.01, 0.01)])
def test_dropout_rate_scale_and_independent_bytes(rate, want):
    x = jnp.ones((256, 8, 1024))
    y = np.asarray(L.dropout(x, rate, jax.random.key(3)))
    dropped = y == 0
    # 2.1M draws: the std of the fraction is < 0.0004 (5 sigma below)
    assert abs(dropped.mean() - want) < 0.0016, (dropped.mean(), want)
    # kept values are scaled so the expectation is x
    assert abs(y.mean() - 1.0) < 0.003
    np.testing.assert_allclose(y[~dropped], 1.0 / (1.0 - want), rtol=1e-6)
    # the four bytes of one random word decide four different elements independently
    per_byte = dropped.reshape(-1, 4)
    for j in range(4):
        assert abs(per_byte[:, j].mean() - want) < 0.003
    both = (per_byte[:, 0] & per_byte[:, 1]).mean()
    assert abs(both - want * want) < 0.003, "bytes of one word are correlated"
    # same key, same mask; another key, another mask
    np.testing.assert_array_equal(np.asarray(L.dropout(x, rate, jax.random.key(3))), y)
    assert (np.asarray(L.dropout(x, rate, jax.random.key(4))) != y).mean() > rate


def test_dropout_falls_back_to_32_bits_where_the_last_axis_is_not_a_multiple_of_4():
    y = np.asarray(L.dropout(jnp.ones((4096, 7)), 0.1, jax.random.key(0)))
    assert abs((y == 0).mean() - 0.1) < 0.005
    np.testing.assert_allclose(y[y != 0], 1 / 0.9, rtol=1e-6)
    assert L.dropout(jnp.ones((3, 4)), 0.1, None) is not None  # eval: identity
    with pytest.raises(ValueError, match="dropout rate"):
        L.dropout(jnp.ones((3, 4)), 1.0, jax.random.key(0))


def test_gelu_is_the_exact_gelu_and_its_gradient():
    x = jnp.linspace(-8, 8, 10001)
    np.testing.assert_allclose(L.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    g = jax.vmap(jax.grad(L.gelu))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_stacked_qkv_equals_three_products(kind):
    cfg = tiny_cfg(kind).model
    k = jax.random.split(jax.random.key(0), 8)
    h, d, hd = cfg.heads, cfg.hidden, cfg.dim_per_head
    p = {n + "_w": jax.random.normal(k[i], (h, hd, d)) for i, n in enumerate("qkv")}
    p.update({n + "_b": jax.random.normal(k[3 + i], (h, hd)) for i, n in enumerate("qkv")})
    x = jax.random.normal(k[7], (2, 5, d))
    q, kk, v = T.project_qkv(cfg, p, x, jnp.float32)
    for got, n in zip((q, kk, v), "qkv"):
        want = jnp.einsum("bsd,hed->bshe", x, p[n + "_w"]) + p[n + "_b"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # grouped-query weights (fewer kv heads) take the three-product path
    p_gqa = {**p, "k_w": p["k_w"][:1], "v_w": p["v_w"][:1], "k_b": p["k_b"][:1], "v_b": p["v_b"][:1]}
    q2, k2, _ = T.project_qkv(cfg, p_gqa, x, jnp.float32)
    assert q2.shape == (2, 5, h, hd) and k2.shape == (2, 5, 1, hd)
    np.testing.assert_allclose(k2[:, :, 0], kk[:, :, 0], rtol=1e-5, atol=1e-5)


def test_top1_correct_is_argmax_equals_label():
    logits = jax.random.normal(jax.random.key(1), (6, 9, 50))
    labels = jax.random.randint(jax.random.key(2), (6, 9), 0, 50)
    labels = labels.at[0].set(logits[0].argmax(-1))  # a row that is all correct
    want = (logits.argmax(-1) == labels).astype(jnp.float32)
    np.testing.assert_array_equal(top1_correct(logits, labels), want)
    assert float(want.sum()) >= 9
