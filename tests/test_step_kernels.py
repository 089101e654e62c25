"""The train step's faster pieces compute what the plain versions do: erf GELU and the
max-based training accuracy (benchmarks/step_variants.py times each against the plain one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.models import layers as L
from jtl.tasks.base import top1_correct


def test_gelu_is_the_exact_gelu_and_its_gradient():
    x = jnp.linspace(-8, 8, 10001)
    np.testing.assert_allclose(L.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    g = jax.vmap(jax.grad(L.gelu))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6)


def test_top1_correct_is_argmax_equals_label():
    logits = jax.random.normal(jax.random.key(1), (6, 9, 50))
    labels = jax.random.randint(jax.random.key(2), (6, 9), 0, 50)
    labels = labels.at[0].set(logits[0].argmax(-1))  # a row that is all correct
    want = (logits.argmax(-1) == labels).astype(jnp.float32)
    np.testing.assert_array_equal(top1_correct(logits, labels), want)
    assert float(want.sum()) >= 9


def test_model_flops_count_frozen_layers_without_their_weight_gradients():
    from helpers import tiny_cfg
    from jtl.metrics import layer_flops_per_token, train_flops_per_step
    m = tiny_cfg("mlm").model
    layers = 4 * 16 * m.layers * layer_flops_per_token(m, 16)
    full = train_flops_per_step(m, 4, 16, "classification")
    assert full == 3 * layers
    assert train_flops_per_step(m, 4, 16, "classification", freeze=("backbone",)) == layers
    assert train_flops_per_step(m, 4, 16, "classification", freeze=("backbone.layers",)) == 2 * layers
    assert train_flops_per_step(m, 4, 16, "classification", freeze=("backbone.embed",)) == full
