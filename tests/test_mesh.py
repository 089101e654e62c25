"""Mesh construction and device-count / divisibility errors."""
import jax
import pytest

from jtl import config, sharding as S
from jtl.config import ConfigError, MeshConfig


def test_mesh_rest_axis():
    assert S.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert S.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    mesh = S.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_too_big():
    with pytest.raises(ConfigError, match="needs 16 devices but only 8 are available"):
        S.make_mesh(MeshConfig(data=4, fsdp=4, tensor=1))
    with pytest.raises(ConfigError, match="not divisible by the fixed axes"):
        S.make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))


def test_batch_and_heads_divisibility():
    mesh = S.make_mesh((4, 2, 1))
    with pytest.raises(ConfigError, match=r"train.batch_size=12 .* not divisible by mesh data x fsdp = 8"):
        S.check_batch_fits(12, 1, mesh)
    cfg = config.load("tiny-mlm", ["model.heads=2", "model.hidden=64", "model.mlp=128"])
    with pytest.raises(ConfigError, match="model.heads=2 is not divisible by mesh.tensor=4"):
        S.check_model_fits(cfg.model, S.make_mesh((1, 2, 4)))


def test_rules_map_logical_names():
    assert S.spec(("batch", "length", "embed")) == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    assert S.spec(("mlp", "embed")) == jax.sharding.PartitionSpec("tensor", "fsdp")
