"""The device mesh and the one table of logical-axis rules.

Parameters and activations name their axes (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``vocab``, ``batch``, ``length``, ``layers``); ``RULES`` maps each
name to mesh axes. Data parallel, FSDP and tensor parallel are mesh shapes over
the same rules, never different code:

* ``data``   splits the batch; parameters are replicated.
* ``fsdp``   splits the batch *and* shards every parameter's ``embed`` axis
             (ZeRO-3: XLA all-gathers weights before use, reduce-scatters grads).
* ``tensor`` splits heads / MLP width / vocab (Megatron-style).
"""
from __future__ import annotations

import contextlib
import logging
import math

import jax
import numpy as np
from flax import nnx
from flax.linen import logical_to_mesh_axes, with_logical_constraint
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jtl.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters for activations: linen's resolver skips a mesh axis already used
# in the same array, so ``batch`` must come before ``embed``.
RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("classes", None),
    ("type_vocab", None),
    ("positions", None),
)
LOGICAL_NAMES = tuple(name for name, _ in RULES)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check the product against the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not "
                              f"divisible by the fixed axes (product {known})")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) > n_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                          f"{math.prod(sizes)} devices but only {n_devices} are available "
                          f"({jax.devices()[0].platform}); set one axis to -1 to use the rest")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | tuple[int, int, int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices)) if isinstance(cfg, MeshConfig) else tuple(cfg)
    if isinstance(cfg, MeshConfig) and math.prod(shape) < len(devices):
        logging.getLogger("jtl").warning(
            "mesh data=%d fsdp=%d tensor=%d uses %d of %d devices; %d stay idle (set one axis to -1 "
            "to use the rest)", *shape, math.prod(shape), len(devices), len(devices) - math.prod(shape))
    # Auto axes: GSPMD propagates shardings; logical constraints are real constraints.
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[: math.prod(shape)])
    if tensor_spans_processes(mesh.devices):
        logging.getLogger("jtl").warning(
            "mesh.tensor=%d spans processes (hosts): tensor parallelism exchanges activations in every "
            "layer, over the network between hosts; keep mesh.tensor <= the %d devices of one process "
            "and give the rest to data/fsdp", shape[2], jax.local_device_count())
    return mesh


def tensor_spans_processes(devices: np.ndarray) -> bool:
    """Whether some group of devices along the last (tensor) mesh axis lives on several
    processes; data and fsdp may span hosts, tensor should not."""
    rows = np.asarray(devices).reshape(-1, np.shape(devices)[-1])
    return any(len({d.process_index for d in row}) > 1 for row in rows)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh + rules context, needed while creating params and while tracing.

    An ``AbstractMesh`` (AOT analysis for a mesh bigger than this machine) is
    activated with ``use_abstract_mesh``: ``jax.set_mesh`` only takes a real one."""
    ctx = (jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, jax.sharding.AbstractMesh)
           else jax.set_mesh(mesh))
    with ctx, nnx.logical_axis_rules(RULES):
        yield


def constrain(x, names: tuple):
    """Activation sharding constraint by logical names (no-op outside a mesh)."""
    return with_logical_constraint(x, names)


def spec(names: tuple) -> P:
    with nnx.logical_axis_rules(RULES):
        return logical_to_mesh_axes(names)


def named(mesh: Mesh, names: tuple) -> NamedSharding:
    return NamedSharding(mesh, spec(names))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return named(mesh, ("batch",) + (None,) * (ndim - 1))


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_model_fits(model_cfg, mesh: Mesh) -> None:
    t = mesh.shape["tensor"]
    for key, v in (("model.heads", model_cfg.heads), ("model.kv_heads", model_cfg.num_kv_heads),
                   ("model.mlp", model_cfg.mlp), ("model.vocab_size", model_cfg.vocab_size)):
        if v % t:
            raise ConfigError(f"{key}={v} is not divisible by mesh.tensor={t}")
    f = mesh.shape["fsdp"]
    if model_cfg.hidden % f:
        raise ConfigError(f"model.hidden={model_cfg.hidden} is not divisible by mesh.fsdp={f}")


def check_batch_fits(batch_size: int, microbatches: int, mesh: Mesh, key="train.batch_size") -> None:
    n = batch_divisor(mesh)
    if (batch_size // microbatches) % n:
        raise ConfigError(f"{key}={batch_size} with train.microbatches={microbatches} gives "
                          f"{batch_size // microbatches} rows per microbatch, not divisible by "
                          f"mesh data x fsdp = {n}")


def global_batch(mesh: Mesh, host_batch: dict) -> dict:
    """Per-host numpy rows -> global jax.Arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in host_batch.items()}


def per_device_bytes(tree) -> int:
    """Bytes one device holds for a tree of (sharded) arrays or ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total
