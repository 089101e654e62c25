"""The pure train step: gradient accumulation, no recompiles, no host transfers, NaN policy."""
import jax
import numpy as np
import pytest
from flax import nnx

from jtl import sharding as S
from jtl.tasks import TaskSpec
from jtl.train import build

from helpers import lm_batch, tiny_cfg

SPEC = TaskSpec(mask_id=4, max_predictions=4)


def params_after(cfg, mesh_shape, batch, steps=2):
    mesh = S.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    setup = build(cfg, SPEC, mesh, total_steps=10)
    gb = S.global_batch(mesh, batch)
    state, losses = setup.state, []
    for _ in range(steps):
        state, m = setup.train_step(state, gb)
        losses.append(float(m["loss"]))
    return {k: np.array(v) for k, v in nnx.to_flat_state(state[0])}, losses


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_microbatches_equal_one_big_batch(kind):
    batch = lm_batch(kind, batch=16)
    big, big_losses = params_after(tiny_cfg(kind), (2, 2, 1), batch)
    acc, acc_losses = params_after(tiny_cfg(kind, **{"train.microbatches": 4}), (2, 2, 1), batch)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for k in big:
        # Adam divides by sqrt(v): for near-zero gradients float32 summation order shows up
        # in the update, so allow 0.3% of one lr=1e-2 step.
        np.testing.assert_allclose(acc[k], big[k], rtol=1e-4, atol=3e-5, err_msg=str(k))


def test_no_recompile_and_no_host_transfer_after_first_step():
    compiles = []

    def listener(event, _secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    cfg = tiny_cfg("mlm", **{"train.microbatches": 2, "model.dropout": 0.1})
    mesh = S.make_mesh((2, 2, 2))
    setup = build(cfg, SPEC, mesh, total_steps=10)
    batches = [S.global_batch(mesh, lm_batch("mlm", seed=i)) for i in range(4)]
    state, metrics = setup.train_step(setup.state, batches[0])
    jax.block_until_ready(metrics)
    n = len(compiles)
    with jax.transfer_guard("disallow"):
        for b in batches[1:]:
            state, metrics = setup.train_step(state, b)
    jax.block_until_ready(metrics)
    assert len(compiles) == n, "the step compiled again after step 1"
    assert int(metrics["step"]) == 4


def test_nan_skip_keeps_params_and_counts():
    cfg = tiny_cfg("clm", **{"train.nan_policy": "skip"})
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = build(cfg, SPEC, mesh, total_steps=10)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(setup.state[0])}  # copy: state is donated
    bad = lm_batch("clm")
    bad["loss_weights"] = bad["loss_weights"] * np.float32("nan")
    state, m = setup.train_step(setup.state, S.global_batch(mesh, bad))
    assert not bool(m["finite"])
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(state[0])}
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    state, m = setup.train_step(state, S.global_batch(mesh, lm_batch("clm")))
    assert bool(m["finite"]) and int(m["step"]) == 2


def test_runs_of_one_process_share_programs_only_when_nothing_traced_differs():
    """Runs that differ only in what no program sees (data paths, seeds, logging) share
    the traced and compiled programs; any key a program sees gives new ones."""
    from jtl.train import compiled_programs
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    base = tiny_cfg("mlm")
    first = compiled_programs(base, SPEC, mesh, 10)
    untraced = tiny_cfg("mlm", **{"train.seed": 7, "data.sample_seed": 3, "run_dir": "/tmp/elsewhere",
                                  "data.train": "other.txt", "train.log_every": 1, "checkpoint.enabled": True,
                                  "task.generate_tokens": 8})
    assert compiled_programs(untraced, SPEC, mesh, 10) is first
    for over in ({"optim.lr": 2e-2}, {"model.dropout": 0.1}, {"data.mask_prob": 0.2},
                 {"train.nan_policy": "skip"}, {"optim.freeze": ("embed",)}, {"task.label_smoothing": 0.1}):
        assert compiled_programs(tiny_cfg("mlm", **over), SPEC, mesh, 10) is not first, over
    assert compiled_programs(base, SPEC, mesh, 11) is not first  # the schedule's length
    assert compiled_programs(base, TaskSpec(mask_id=4, max_predictions=5), mesh, 10) is not first
    assert compiled_programs(base, SPEC, S.make_mesh((2, 1, 1), jax.devices()[:2]), 10) is not first
    # Two seeds through one program still start from different weights.
    a = build(base, SPEC, mesh, 10).params
    b = build(untraced, SPEC, mesh, 10).params
    ka = dict(nnx.to_flat_state(a))
    kb = dict(nnx.to_flat_state(b))
    k = next(p for p in ka if ".".join(map(str, p)).endswith("embed.tokens"))
    assert not np.array_equal(np.asarray(ka[k]), np.asarray(kb[k]))


def test_dropout_bits_are_the_same_with_the_unrolled_threefry_and_the_step_has_no_rng_loop():
    """jtl lowers threefry unrolled on CPU (faster: no 5-iteration loop over the bit
    array); the bits must be jax's own, and the train step must really lose the loop."""
    from jtl.models import layers as L
    draw = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 48)))
    key = jax.random.key(7)
    try:
        assert L.threefry_unrolled_on_cpu(False)
        jax.clear_caches()
        rolled = np.asarray(draw(key))
        assert "stablehlo.while" in draw.lower(key).as_text()
        assert L.threefry_unrolled_on_cpu(True)
        jax.clear_caches()
        unrolled = np.asarray(draw(key))
        assert "stablehlo.while" not in draw.lower(key).as_text()
    finally:
        L.threefry_unrolled_on_cpu(True)  # jtl's default for the rest of this process
    np.testing.assert_array_equal(rolled, unrolled)
    cfg = tiny_cfg("mlm", **{"model.dropout": 0.1, "model.attention_dropout": 0.1, "model.scan_layers": False})
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = build(cfg, SPEC, mesh, total_steps=10)
    hlo = setup.train_step.lower(setup.state, S.global_batch(mesh, lm_batch("mlm"))).as_text()
    assert "threefry" in hlo and "stablehlo.while" not in hlo, "the step still loops over its random bits"


def test_rng_impl_philox_on_a_sharded_mesh_is_refused_naming_the_key():
    from jtl.config import ConfigError
    mesh = S.make_mesh((2, 1, 1), jax.devices()[:2])
    with pytest.raises(ConfigError, match=r"train\.rng_impl=philox4x32 works on one device only.*threefry2x32"):
        build(tiny_cfg("mlm", **{"train.rng_impl": "philox4x32"}), SPEC, mesh, total_steps=10)
