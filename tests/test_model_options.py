"""Model/optimizer options that must not change the math: scan, remat, dtype; decay masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtl import sharding as S
from jtl.config import OptimConfig
from jtl.data.pipeline import train_iterator
from jtl.optim import make_tx
from jtl.tasks import TaskSpec
from jtl.train import build

from helpers import lm_batch, tiny_cfg

SPEC = TaskSpec(mask_id=4, max_predictions=4)


def losses(cfg, steps=2):
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])  # the math, not the sharding (test_sharded_parity)
    setup = build(cfg, SPEC, mesh, total_steps=10)
    batch = S.global_batch(mesh, lm_batch(cfg.task.kind))
    state, out = setup.state, []
    for _ in range(steps):
        state, m = setup.train_step(state, batch)
        out.append(float(m["loss"]))
    return np.array(out)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_scan_and_remat_match_unrolled(kind):
    ref = losses(tiny_cfg(kind))
    np.testing.assert_allclose(losses(tiny_cfg(kind, **{"model.scan_layers": True})), ref, rtol=1e-5)
    np.testing.assert_allclose(losses(tiny_cfg(kind, **{"model.scan_layers": True, "model.remat": "full"})),
                               ref, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny_cfg("clm", **{"model.dtype": "bfloat16"})
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = build(cfg, SPEC, mesh, total_steps=10)
    assert all(v.dtype == jnp.float32 for _, v in setup.params.flat_state())
    ref = losses(tiny_cfg("clm"), steps=1)
    got = losses(cfg, steps=1)
    assert abs(got[0] - ref[0]) / ref[0] < 2e-2  # same model, bf16 matmuls


def test_weight_decay_only_on_matrices_and_embeddings():
    params = {"backbone": {"layers": {"q_w": jnp.ones((2, 2)), "q_b": jnp.ones((2,)),
                                      "attn_norm_scale": jnp.ones((2,))},
                           "embed": {"tokens": jnp.ones((3, 2))}}}
    tx = make_tx(OptimConfig(lr=0.1, weight_decay=0.5, clip_norm=None, warmup_steps=0, schedule="constant"), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert np.allclose(new["backbone"]["layers"]["q_w"], 1 - 0.1 * 0.5)
    assert np.allclose(new["backbone"]["embed"]["tokens"], 1 - 0.1 * 0.5)
    assert np.allclose(new["backbone"]["layers"]["q_b"], 1.0)
    assert np.allclose(new["backbone"]["layers"]["attn_norm_scale"], 1.0)


def test_layer_decay_scales_each_layer_of_the_stacked_params():
    """optim.layer_decay=d: layer i of L moves at lr*d**(L-i), embeddings at lr*d**(L+1),
    the head at lr (first Adam step on a constant gradient = lr * sign)."""
    d, n = 0.5, 4
    params = {"backbone": {"embed": {"tokens": jnp.ones((3, 2))}, "layers": {"q_w": jnp.ones((n, 2, 2))}},
              "cls_w": jnp.ones((2, 2))}
    tx = make_tx(OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=None, schedule="constant",
                             layer_decay=d), 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["cls_w"], -0.1, rtol=1e-5)
    for i in range(n):
        np.testing.assert_allclose(updates["backbone"]["layers"]["q_w"][i], -0.1 * d ** (n - i), rtol=1e-5)
    np.testing.assert_allclose(updates["backbone"]["embed"]["tokens"], -0.1 * d ** (n + 1), rtol=1e-5)


def test_freeze_prefix_keeps_parameters_and_leaves_them_out_of_the_optimizer():
    cfg = tiny_cfg("mlm", **{"optim.freeze": ("backbone.embed",), "optim.weight_decay": 0.1})
    mesh = S.make_mesh((2, 1, 1), jax.devices()[:2])
    setup = build(cfg, SPEC, mesh, total_steps=10)
    before = {".".join(map(str, p)): np.asarray(v[...]) for p, v in setup.params.flat_state()}
    state = setup.state
    for _ in range(2):
        state, m = setup.train_step(state, S.global_batch(mesh, lm_batch("mlm")))
    assert np.isfinite(float(m["loss"]))
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in state[0].flat_state()}
    frozen = [k for k in before if k.startswith("backbone.embed.")]
    assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
    assert not np.array_equal(before["backbone.layers.q_w"], after["backbone.layers.q_w"])
    # No Adam moments for what does not train (the point of freezing: memory and time).
    opt_paths = {".".join(map(str, p)) for p, _ in state[1].flat_state()}
    assert not any(".embed." in p for p in opt_paths)
    assert any("q_w" in p for p in opt_paths)


def test_grain_iterator_deterministic_and_host_slices_disjoint():
    arrays = {"x": np.arange(40)}
    a = [b["x"].tolist() for b, _ in zip(train_iterator(arrays, 8, seed=3), range(6))]
    b = [b["x"].tolist() for b, _ in zip(train_iterator(arrays, 8, seed=3), range(6))]
    c = [b["x"].tolist() for b, _ in zip(train_iterator(arrays, 8, seed=4), range(6))]
    assert a == b and a != c
    assert sorted(sum(a[:5], [])) == list(range(40))  # one epoch = every row once
    h0 = {x for b, _ in zip(train_iterator(arrays, 8, seed=3, process_index=0, process_count=2), range(5))
          for x in b["x"]}
    h1 = {x for b, _ in zip(train_iterator(arrays, 8, seed=3, process_index=1, process_count=2), range(5))
          for x in b["x"]}
    assert not h0 & h1 and len(h0 | h1) == 40
    # the global batches do not depend on the process count: process p holds rows
    # [p*B/P, (p+1)*B/P) of the batch a single process would see (into a second epoch too)
    one = [b["x"].tolist() for b, _ in zip(train_iterator(arrays, 8, seed=3), range(8))]
    parts = [[b["x"].tolist() for b, _ in zip(train_iterator(arrays, 8, seed=3, process_index=p,
                                                             process_count=4), range(8))] for p in range(4)]
    assert [sum((parts[p][i] for p in range(4)), []) for i in range(8)] == one
    assert one[5] != one[0] and sorted(sum(one[5:8], [])) != sorted(sum(one[:3], []))  # epoch 2 reshuffled
