"""Same model, data and seed give the same loss and gradients on every mesh."""
import jax
import numpy as np
import pytest
from flax import nnx

from jtl import sharding as S
from jtl.tasks import TaskSpec, loss_and_outputs
from jtl.train import build

from helpers import lm_batch, tiny_cfg

# The reference, full FSDP, and all three axes at once (data parallelism alone is
# the (2, 2, 2) mesh's data axis; test_mesh covers the mesh shapes themselves). MLM
# checks all three axes at once, CLM full FSDP (one compile fewer than every pair).
MESHES = [(1, 1, 1), (1, 8, 1), (2, 2, 2)]


def loss_and_grads(setup, batch):
    cfg, spec = setup.cfg, setup.spec

    def f(state, batch):
        model = nnx.merge(setup.graphdef, state)[0]
        mdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            ls, c, _ = loss_and_outputs(cfg, spec, nnx.merge(mdef, p), batch, jax.random.key(3))
            return ls / c
        return jax.value_and_grad(loss)(params)

    with S.activate(setup.mesh):
        loss, grads = jax.jit(f)(setup.state, batch)
    return float(loss), {k: np.asarray(v) for k, v in nnx.to_flat_state(grads)}


def run(kind, mesh_shape, steps=2, **over):
    cfg = tiny_cfg(kind, **over)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = S.make_mesh(mesh_shape, devices)
    spec = TaskSpec(mask_id=4, max_predictions=4)
    setup = build(cfg, spec, mesh, total_steps=10)
    batch = S.global_batch(mesh, lm_batch(kind))
    loss0, grads = loss_and_grads(setup, batch)
    state, losses = setup.state, []
    for _ in range(steps):
        state, m = setup.train_step(state, batch)
        losses.append(float(m["loss"]))
    setup.state = state
    return setup, loss0, grads, np.array(losses)


@pytest.mark.parametrize("kind,meshes", [("mlm", [MESHES[0], MESHES[2]]), ("clm", [MESHES[0], MESHES[1]])])
def test_loss_and_grads_match_across_meshes(kind, meshes):
    over = {"model.dropout": 0.1, "model.attention_dropout": 0.1}  # dropout must not depend on the mesh
    _, ref_loss, ref_grads, ref_losses = run(kind, meshes[0], **over)
    for shape in meshes[1:]:
        _, loss, grads, losses = run(kind, shape, **over)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (shape, loss, ref_loss)
        gmax = max(np.abs(g).max() for g in ref_grads.values())
        for k, g in ref_grads.items():
            # Relative to the tensor's own scale, or to 1e-3 of the largest gradient for
            # tensors whose true gradient is ~0 (e.g. the key bias: softmax is shift-invariant).
            scale = max(np.abs(g).max(), 1e-3 * gmax)
            err = np.abs(grads[k] - g).max() / scale
            assert err < 1e-4, (shape, k, err)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))


def test_param_shardings_follow_rules():
    setup, *_ = run("clm", (2, 2, 2), steps=1)
    specs = {".".join(map(str, p)): v.sharding.spec for p, v in setup.params.flat_state()}
    P = jax.sharding.PartitionSpec
    assert specs["backbone.embed.tokens"] == P("tensor", "fsdp")
    assert specs["backbone.layers.q_w"] == P(None, "tensor", None, "fsdp")
    assert specs["backbone.layers.up_w"] == P(None, "tensor", "fsdp")
    assert specs["backbone.layers.down_w"] == P(None, "fsdp", "tensor")
    # Optimizer moments are sharded like the parameters.
    opt_specs = {".".join(map(str, p)): v.sharding.spec for p, v in setup.state[1].flat_state()}
    mu = [k for k in opt_specs if k.endswith("mu.backbone.layers.q_w")]
    assert mu and opt_specs[mu[0]] == P(None, "tensor", None, "fsdp")


def test_fsdp_bytes_per_device_are_one_nth():
    cfg = tiny_cfg("mlm", **{"model.hidden": 64, "model.mlp": 128})
    full = S.make_mesh((1, 1, 1), jax.devices()[:1])
    fsdp = S.make_mesh((1, 8, 1))
    spec = TaskSpec(mask_id=4, max_predictions=4)
    b1 = S.per_device_bytes(build(cfg, spec, full, 10).params)
    b8 = S.per_device_bytes(build(cfg, spec, fsdp, 10).params)
    # Everything with an embed axis is split 8 ways; only tiny vectors (norms, biases) replicate.
    assert b8 <= b1 / 8 * 1.25, (b1, b8)
