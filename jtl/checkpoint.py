"""Orbax checkpoints of a run: params, optimizer state, data iterator, config.

Layout: ``RUN_DIR/checkpoints/<step>/{params,opt,data,config}``. Items are kept
separate so that fine-tuning can restore only the backbone parameters of a
pretraining run (``model.init_from: RUN_DIR``), on any mesh.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
    pass


def _to_pure(state):
    return state.to_pure_dict() if hasattr(state, "to_pure_dict") else state


def manager(directory: Path, keep: int = 2, async_save: bool = True,
            best_metric: str | None = None, best_mode: str = "max") -> ocp.CheckpointManager:
    from orbax.checkpoint import checkpoint_managers as cm
    policies = [cm.LatestN(n=keep)]
    if best_metric:
        policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers={
        "params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, config: dict, data_state: dict | None = None,
         meta: dict | None = None, metrics: dict | None = None, force: bool = False) -> bool:
    items = dict(params=ocp.args.StandardSave(_to_pure(state[0])),
                 opt=ocp.args.StandardSave(_to_pure(state[1])),
                 config=ocp.args.JsonSave(config), data=ocp.args.JsonSave(data_state or {}),
                 meta=ocp.args.JsonSave(meta or {}))
    return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def find_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
        return p
    raise CheckpointError(f"{path}: no jtl checkpoints here (expected RUN_DIR/checkpoints/<step>/)")


def restore_params(path: str | Path, abstract_params, step: int | None = None,
                   prefix: tuple[str, ...] = ()) -> dict:
    """Parameters from a jtl checkpoint that exist in ``abstract_params`` (an nnx.State of
    ShapeDtypeStruct with shardings), restored straight into those shardings.

    Returns {path tuple: array}. Only paths under ``prefix`` (e.g. ("backbone",)) are read.
    """
    ckdir = find_checkpoint_dir(path)
    mngr = ocp.CheckpointManager(ckdir.absolute(), item_handlers={"params": ocp.PyTreeCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{ckdir}: no committed checkpoint")
    saved = mngr.item_metadata(step)["params"]
    saved_flat = {tuple(str(getattr(k, "key", k)) for k in p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {}
    problems = []
    for p, v in abstract_params.flat_state():
        key = tuple(map(str, p))
        if prefix and key[:len(prefix)] != prefix:
            continue
        meta = saved_flat.get(key)
        if meta is None:
            continue
        if tuple(meta.shape) != tuple(v.shape):
            problems.append(f"{'.'.join(key)}: checkpoint {tuple(meta.shape)} vs model {tuple(v.shape)}")
            continue
        want[key] = v
    if problems:
        raise CheckpointError(f"{ckdir}/{step}: shape mismatch:\n  " + "\n  ".join(problems))
    if not want:
        raise CheckpointError(f"{ckdir}/{step}: no parameters in common with this model")
    target = {}
    for key, v in want.items():
        node = target
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).params
    mngr.close()
    out = {}
    for p, arr in jax.tree_util.tree_flatten_with_path(restored)[0]:
        key = tuple(str(getattr(k, "key", k)) for k in p)
        out[tuple(int(k) if k.isdigit() else k for k in key)] = arr
    return out


def read_json_item(path: str | Path, item: str, step: int | None = None) -> dict:
    ckdir = find_checkpoint_dir(path)
    steps = sorted(int(c.name) for c in ckdir.iterdir() if c.name.isdigit())
    if not steps:
        raise CheckpointError(f"{ckdir}: no committed checkpoint")
    step = steps[-1] if step is None else step
    f = ckdir / str(step) / item / "metadata"
    if not f.exists():
        raise CheckpointError(f"{f}: missing")
    return json.loads(f.read_text())


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Full (params, opt) state restored into the shardings of ``abstract_state``."""
    target_p = _abstract(_to_pure(abstract_state[0]))
    target_o = _abstract(_to_pure(abstract_state[1]))
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target_p), opt=ocp.args.StandardRestore(target_o),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(abstract_state[0], r.params)
    nnx.replace_by_pure_dict(abstract_state[1], r.opt)
    return abstract_state, r.data, r.config
