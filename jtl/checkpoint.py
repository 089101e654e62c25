"""Orbax checkpoints of a run: params, optimizer state, data iterator, config, meta.

Layout: ``RUN_DIR/checkpoints/<step>/{params,opt,data,config,meta}``. Items are kept
separate so that fine-tuning can restore only the backbone parameters of a
pretraining run (``model.init_from: RUN_DIR``), on any mesh.

What makes a checkpoint safe to resume from:

* Saves are asynchronous and atomic: Orbax writes ``<step>.orbax-checkpoint-tmp``
  and renames it when complete, so a kill mid-save leaves only a tmp dir that no
  listing picks up.
* Old steps are never deleted in place: retention renames them into
  ``checkpoints/.trash`` (one atomic rename; ``todelete_subdir``), which we empty
  later. Deleting in place can be killed half way and leave a listed but broken
  ``<step>/`` (seen in 4/20 kills with orbax 0.12.8).
* Retention keeps the latest ``keep`` steps, every ``keep_every``-th step and the
  best step by a metric (preservation policies, so the latest is never dropped
  in favour of the best), and drops old steps only after a newer one committed.
* Every candidate step is checked (all items present) before it is trusted; a
  restore that still fails names the step and, when ``fallback`` is allowed, moves
  on to the previous committed step with a loud warning (and, in the run's own
  checkpoints, moves the broken step to ``checkpoints.damaged/``).
* Once a step committed, the sha256 of each of its item files is recorded in
  ``<step>/jtl_checksums.json``; every restore verifies them first, so a file changed
  after it was written (bit rot, a bad copy) is refused naming the file instead of
  restoring as finite but wrong values.
* ``meta`` records the model family and config; resuming a different family or
  other parameter shapes is refused with the differing paths listed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from jtl.optim import tree_finite

log = logging.getLogger("jtl")

FORMAT = 1
TRASH = ".trash"
ARRAY_ITEMS = ("params", "opt")
JSON_ITEMS = ("config", "data", "meta")
CHECKSUMS = "jtl_checksums.json"


class CheckpointError(RuntimeError):
    pass


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is fine but belongs to another model (never a reason to fall back)."""


def _to_pure(state):
    return state.to_pure_dict() if hasattr(state, "to_pure_dict") else state


def _metric_fn(name: str, mode: str):
    worst = -np.inf if mode == "max" else np.inf  # steps saved without the metric never win

    def get(m):
        v = (m or {}).get(name)
        return worst if v is None or not np.isfinite(v) else float(v)
    return get


def manager(directory: Path, keep: int = 2, async_save: bool = True,
            best_metric: str | None = None, best_mode: str = "max",
            keep_every: int = 0) -> ocp.CheckpointManager:
    """A CheckpointManager for the items above with jtl's retention and deletion rules."""
    policies = [cm.LatestN(n=max(int(keep), 1))]  # never 0: the latest is what resumes
    if keep_every:
        policies.append(cm.EveryNSteps(interval_steps=int(keep_every)))
    best_fn = None
    if best_metric:
        best_fn = _metric_fn(best_metric, best_mode)
        policies.append(cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                 keep_checkpoints_without_metrics=False))  # those: LatestN/EveryNSteps
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, todelete_subdir=TRASH)
    directory = Path(directory).absolute()
    empty_trash(directory)
    return ocp.CheckpointManager(directory, options=options, item_handlers={
        "params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})


def _reader(ckdir: Path, params_handler=None) -> ocp.CheckpointManager:
    """A manager for reading: every item registered (else Orbax warns about each one)."""
    return ocp.CheckpointManager(Path(ckdir).absolute(), item_handlers={
        "params": params_handler or ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})


def _describe(e: Exception) -> str:
    """One readable line for an Orbax/TensorStore error, naming the array when it can."""
    import re
    text = f"{e} {e.__cause__ or ''}"
    m = re.search(r"'path': '([^']+)'", text)
    first = str(e).splitlines()[0][:300] if str(e) else ""
    cause = str(e.__cause__).splitlines()[0][:300] if e.__cause__ else ""
    return (f"{type(e).__name__}: {first}" + (f" (array {m.group(1).rstrip('/')})" if m else "")
            + (f"; cause: {cause}" if cause else ""))


def empty_trash(directory: Path) -> None:
    # Steps in the trash were dropped by retention after a newer step committed; a kill
    # while deleting them here is harmless (the trash is never listed as a step).
    if jax.process_index() == 0 and (Path(directory) / TRASH).is_dir():
        shutil.rmtree(Path(directory) / TRASH, ignore_errors=True)


def model_meta(cfg_dict: dict) -> dict:
    m = cfg_dict.get("model", {})
    return {"format": FORMAT, "family": m.get("family"), "task": cfg_dict.get("task", {}).get("kind"),
            "model": m}


def save(mngr: ocp.CheckpointManager, step: int, state, config: dict, data_state: dict | None = None,
         meta: dict | None = None, metrics: dict | None = None, force: bool = False) -> bool:
    """Start an (async) save of ``state`` = (params, opt) at ``step``; False if not saved
    (the step exists already). A failure of an earlier async save surfaces here."""
    meta = {**model_meta(config), "step": int(step), "time": time.time(), **(meta or {})}
    items = dict(params=ocp.args.StandardSave(_to_pure(state[0])),
                 opt=ocp.args.StandardSave(_to_pure(state[1])),
                 config=ocp.args.JsonSave(config), data=ocp.args.JsonSave(data_state or {}),
                 meta=ocp.args.JsonSave(meta))
    if mngr.latest_step() is not None and step <= mngr.latest_step() and not force:
        return False
    wait(mngr)  # the previous save commits and gets its checksums before this one starts
    empty_trash(mngr.directory)
    try:
        saved = mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    except Exception as e:
        raise _save_error(mngr, step, e) from e
    if saved:
        _unhashed.setdefault(mngr, set()).add(int(step))
        record_checksums(mngr)  # a synchronous save has committed already
    return saved


def wait(mngr: ocp.CheckpointManager) -> None:
    """Block until every started save committed and record its checksums; a failed
    write raises CheckpointError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_error(mngr, None, e) from e
    record_checksums(mngr)


# ---------------------------------------------------------------- checksums

_unhashed: "weakref.WeakKeyDictionary[ocp.CheckpointManager, set[int]]" = weakref.WeakKeyDictionary()


def _item_files(step_dir: Path) -> list[Path]:
    return sorted(f for item in (*ARRAY_ITEMS, *JSON_ITEMS) if (step_dir / item).is_dir()
                  for f in (step_dir / item).rglob("*") if f.is_file())


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def record_checksums(mngr: ocp.CheckpointManager) -> None:
    """Write ``<step>/jtl_checksums.json`` for the steps this manager saved that have
    committed since (their item files are final once the step dir has its name). Steps
    still being written wait for the next call (``save`` and ``wait`` call this)."""
    pending = _unhashed.get(mngr)
    if not pending:
        return
    ckdir = Path(mngr.directory)
    for step in sorted(pending):
        d = ckdir / str(step)
        if not d.is_dir():
            continue  # not committed yet
        pending.discard(step)
        if jax.process_index() != 0:
            continue
        try:
            sums = {f.relative_to(d).as_posix(): _sha256(f) for f in _item_files(d)}
            tmp = d / f".{CHECKSUMS}.tmp"
            tmp.write_text(json.dumps({"algorithm": "sha256", "files": sums}, indent=0))
            os.replace(tmp, d / CHECKSUMS)
        except OSError as e:  # the step stays restorable, only unverified
            log.warning("%s: could not record checksums (%s: %s); this step will restore unverified",
                        d, type(e).__name__, e)


def verify_step(ckdir: Path, step: int, items=(*ARRAY_ITEMS, *JSON_ITEMS)) -> bool:
    """Check the files of ``items`` of a step against its recorded checksums. Raises
    CheckpointError naming the first changed or missing file; False (with a warning)
    when the step has no checksums (saved by an older jtl, or killed before recording)."""
    d = Path(ckdir) / str(step)
    try:
        recorded = json.loads((d / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        log.warning("%s: no %s (saved by an older jtl, or killed before recording them): "
                    "restoring without verifying its files", d, CHECKSUMS)
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / CHECKSUMS}: unreadable ({type(e).__name__}: {e})") from e
    for name, digest in sorted(recorded.items()):
        if name.split("/")[0] not in items:
            continue
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (it was part of step {step} when it was saved)")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch: the file changed after step {step} was "
                                  f"saved (damaged disk or copy?); refusing to restore from it")
    return True


def _save_error(mngr, step, e) -> CheckpointError:
    ckdir = Path(mngr.directory)
    good = valid_steps(ckdir, warn=False)
    if step is None:  # a failed async save: its step is the name of the unfinished tmp dir
        pending = [p.name.split(".")[0] for p in ckdir.glob("*.orbax-checkpoint-tmp*")]
        step = max((int(p) for p in pending if p.isdigit()), default=None)
    what = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointError(
        f"saving {what} to {ckdir} failed: {type(e).__name__}: {e} (disk full or not writable?). "
        f"Committed checkpoints are untouched: "
        f"{'latest is step ' + str(good[-1]) if good else 'there are none'}")


# ---------------------------------------------------------------- finding steps

def find_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
        return p
    raise CheckpointError(f"{path}: no jtl checkpoints here (expected RUN_DIR/checkpoints/<step>/)")


def locate(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoint dir, step or None = latest) for a run dir, checkpoints dir or step dir."""
    p = Path(path)
    if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists():
        return p.parent, int(p.name)
    return find_checkpoint_dir(p), None


def step_problems(ckdir: Path, step: int) -> list[str]:
    """Why ``ckdir/<step>`` is not a complete committed jtl checkpoint ([] if it looks whole)."""
    d = Path(ckdir) / str(step)
    if not d.is_dir():
        return [f"{d} does not exist"]
    missing = [] if (d / "_CHECKPOINT_METADATA").exists() else ["_CHECKPOINT_METADATA"]
    for item in ARRAY_ITEMS:
        missing += [f"{item}/{f}" for f in ("_METADATA", "manifest.ocdbt") if not (d / item / f).exists()]
        if (d / item).is_dir() and not any((d / item).glob("ocdbt.process_*/d/*")):
            missing.append(f"{item}/ocdbt.process_*/d/ (array data)")
    missing += [f"{item}/metadata" for item in JSON_ITEMS if not (d / item / "metadata").exists()]
    return [f"{d}: missing {m}" for m in missing]


def all_steps(ckdir: Path) -> list[int]:
    ckdir = Path(ckdir)
    if not ckdir.is_dir():
        return []
    return sorted(int(c.name) for c in ckdir.iterdir() if c.name.isdigit() and c.is_dir())


def valid_steps(ckdir: Path, warn: bool = True) -> list[int]:
    """Committed steps that pass ``step_problems`` (ascending). Incomplete ones are logged."""
    good = []
    for s in all_steps(ckdir):
        bad = step_problems(ckdir, s)
        if bad and warn:
            log.warning("CHECKPOINT STEP %d IS INCOMPLETE and will not be used: %s", s, "; ".join(bad))
        elif not bad:
            good.append(s)
    return good


def set_aside(ckdir: Path) -> Path | None:
    """Move existing checkpoints out of the way for a fresh start (nothing is deleted)."""
    from jtl.run.distributed import barrier
    ckdir = Path(ckdir)
    dest = None
    if all_steps(ckdir) and jax.process_index() == 0:
        dest = ckdir.with_name(f"{ckdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        ckdir.rename(dest)
        log.warning("checkpoint.resume=false: moved the existing checkpoints to %s", dest)
    barrier("jtl-set-aside")  # nobody looks for checkpoints before they are gone
    return dest


def set_aside_step(ckdir: Path, step: int) -> Path | None:
    """Move a step that cannot be restored to ``<ckdir>.damaged/<step>-<time>`` (kept for
    inspection, never listed, never deleted). A fallback run then saves that step
    number again instead of finding it taken by the damaged one."""
    src = Path(ckdir) / str(step)
    if jax.process_index() != 0 or not src.is_dir():
        return None
    dest = Path(ckdir).with_name(f"{Path(ckdir).name}.damaged") / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
    log.error("!!! moved the damaged checkpoint step %d to %s", step, dest)
    return dest


# ---------------------------------------------------------------- compatibility

def _flat_shapes(tree) -> dict[str, tuple]:
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {".".join(map(name, p)): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def read_item(ckdir: Path, step: int, item: str) -> dict:
    f = Path(ckdir) / str(step) / item / "metadata"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from e


def check_compatible(ckdir: Path, step: int, cfg_dict: dict, abstract_params) -> None:
    """Refuse a checkpoint of another model family or with other parameter shapes,
    naming each differing parameter path."""
    saved_cfg = read_item(ckdir, step, "config")
    fam, want_fam = saved_cfg.get("model", {}).get("family"), cfg_dict.get("model", {}).get("family")
    if fam != want_fam:
        raise IncompatibleCheckpoint(f"{ckdir}/{step} holds a model.family={fam} model; this run is "
                              f"model.family={want_fam}: refusing to resume from it")
    mngr = _reader(ckdir)
    try:
        saved = _flat_shapes(mngr.item_metadata(step)["params"])
    except Exception as e:
        raise CheckpointError(f"{ckdir}/{step}/params: unreadable metadata ({type(e).__name__}: {e})") from e
    finally:
        mngr.close()
    want = _flat_shapes(_to_pure(abstract_params))
    diffs = [f"{k}: checkpoint {saved.get(k, 'MISSING')} vs model {want.get(k, 'MISSING')}"
             for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    if diffs:
        changed = {k: (saved_cfg.get("model", {}).get(k), v) for k, v in cfg_dict.get("model", {}).items()
                   if saved_cfg.get("model", {}).get(k) != v}
        raise IncompatibleCheckpoint(
            f"{ckdir}/{step}: parameters differ from this run's model (config changes: "
            f"{', '.join(f'model.{k}: {a} -> {b}' for k, (a, b) in changed.items()) or 'none'}):\n  "
            + "\n  ".join(diffs))


# ---------------------------------------------------------------- restoring

def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state, verify: bool = True):
    """Full (params, opt) state restored into the shardings of ``abstract_state`` (any
    mesh), its files verified first unless ``verify=False`` (the caller did).
    Returns (state, data iterator state, config)."""
    if verify:
        verify_step(mngr.directory, step)
    target_p = _abstract(_to_pure(abstract_state[0]))
    target_o = _abstract(_to_pure(abstract_state[1]))
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target_p), opt=ocp.args.StandardRestore(target_o),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(abstract_state[0], r.params)
    nnx.replace_by_pure_dict(abstract_state[1], r.opt)
    return abstract_state, r.data, r.config


def resume(path: str | Path, abstract_state, cfg_dict: dict, step: int | None = None,
           fallback: bool = False, set_aside_damaged: bool = False):
    """Restore the newest usable step of ``path`` (run dir, checkpoints dir or step dir).

    Returns (state, data_state, step, meta) or None when there is no checkpoint. A
    broken step raises CheckpointError, or with ``fallback`` logs loudly and tries
    the previous committed step; with ``set_aside_damaged`` too (the run's own
    checkpoints, which it will save into) the broken steps are moved aside
    (``set_aside_step``) once an older one restored. Family/shape mismatches always raise.
    """
    ckdir, pinned = locate(path)
    step = pinned if step is None else step
    listed = all_steps(ckdir)
    if step is not None and step not in listed:
        raise CheckpointError(f"{ckdir}: no step {step} (committed: {listed})")
    candidates = [s for s in listed if step is None or s <= step]
    if not candidates:
        return None
    errors, damaged = [], []
    for s in reversed(candidates):
        mngr = _reader(ckdir)
        try:
            bad = step_problems(ckdir, s)
            if bad:
                raise CheckpointError("incomplete: " + "; ".join(bad))
            verify_step(ckdir, s)
            check_compatible(ckdir, s, cfg_dict, abstract_state[0])
            state, data_state, _ = restore_state(mngr, s, abstract_state, verify=False)
            if not all_finite(state):
                raise CheckpointError("it holds non-finite parameters or optimizer state")
            meta = read_item(ckdir, s, "meta")
            if set_aside_damaged and damaged:
                from jtl.run.distributed import barrier
                for bad_step in damaged:
                    set_aside_step(ckdir, bad_step)  # process 0 moves; the others wait for it
                barrier("jtl-set-aside-damaged")
            return state, data_state, s, meta
        except IncompatibleCheckpoint:
            raise  # another model: an older step of the same run would not fit either
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            msg = f"{ckdir}/{s}: cannot restore: {_describe(e)}"
            errors.append(msg)
            if not fallback:
                older = [c for c in candidates if c < s]
                hint = (f"; set checkpoint.fallback=true to use the previous committed step {older[-1]}"
                        if older else "")
                raise CheckpointError(msg + hint) from e
            log.error("!!! CHECKPOINT FALLBACK: %s; trying an older step", msg)
            damaged.append(s)
        finally:
            mngr.close()
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))


def resume_source(ck, ckdir: Path):
    """Where a run's state comes from (``ck`` = the config's ``checkpoint`` section): the
    run's own checkpoints in ``ckdir``, else ``resume_from``, else None. With
    ``resume=false`` old steps are moved aside (never deleted) and the answer is None."""
    if not ck.resume:
        set_aside(ckdir)
        return None
    if all_steps(ckdir):
        if ck.resume_from:
            log.warning("checkpoint.resume_from=%s ignored: this run has its own checkpoints in %s",
                        ck.resume_from, ckdir)
        return ckdir
    return ck.resume_from or None


def resume_run(ck, ckdir: Path, abstract_state, cfg_dict: dict):
    """``resume_source``, then ``resume`` from it. Returns None (fresh start) or
    (state, data_state, step, meta, checkpoints dir it came from)."""
    source = resume_source(ck, ckdir)
    if source is None:
        return None
    got = resume(source, abstract_state, cfg_dict, fallback=ck.fallback,
                 set_aside_damaged=Path(source) == Path(ckdir))
    return None if got is None else (*got, locate(source)[0])


_finite = jax.jit(tree_finite)


def all_finite(state) -> bool:
    """True when every float array of ``state`` is finite (one device reduction)."""
    return bool(_finite(_to_pure(state)))


def _pick_step(path: str | Path, step: int | None) -> tuple[Path, int]:
    """(checkpoints dir, step): the given or pinned step, else the newest complete one."""
    ckdir, pinned = locate(path)
    step = pinned if step is None else step
    if step is None:
        good = valid_steps(ckdir)
        if not good:
            raise CheckpointError(f"{ckdir}: no complete committed checkpoint")
        step = good[-1]
    return ckdir, step


def restore_params(path: str | Path, abstract_params, step: int | None = None,
                   prefix: tuple[str, ...] = ()) -> dict:
    """Parameters from a jtl checkpoint that exist in ``abstract_params`` (an nnx.State of
    ShapeDtypeStruct with shardings), restored straight into those shardings.

    Returns {path tuple: array}. Only paths under ``prefix`` (e.g. ("backbone",)) are read.
    """
    from jtl.convert.hf import concrete_sharding  # an AbstractMesh target -> the real devices
    ckdir, step = _pick_step(path, step)
    verify_step(ckdir, step, items=("params",))
    mngr = _reader(ckdir, ocp.PyTreeCheckpointHandler())
    saved = mngr.item_metadata(step)["params"]
    saved_flat = {tuple(str(getattr(k, "key", k)) for k in p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {}
    problems, missing = [], []
    for p, v in abstract_params.flat_state():
        key = tuple(map(str, p))
        if prefix and key[:len(prefix)] != prefix:
            continue
        meta = saved_flat.get(key)
        if meta is None:
            missing.append(".".join(key))
            continue
        if tuple(meta.shape) != tuple(v.shape):
            problems.append(f"{'.'.join(key)}: checkpoint {tuple(meta.shape)} vs model {tuple(v.shape)}")
            continue
        want[key] = v
    if problems:
        raise CheckpointError(f"{ckdir}/{step}: shape mismatch:\n  " + "\n  ".join(problems))
    if want and missing:  # left at their random init, they would silently spoil the transfer
        raise CheckpointError(f"{ckdir}/{step}: the checkpoint lacks {len(missing)} parameter(s) this model "
                              f"has: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; the "
                              f"saved run's architecture differs from this one (compare the model "
                              f"sections of the two config.yaml files)")
    if not want:
        raise CheckpointError(f"{ckdir}/{step}: no parameters in common with this model")
    target = {}
    for key, v in want.items():
        node = target
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=concrete_sharding(v.sharding))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))).params
    except Exception as e:
        raise CheckpointError(f"{ckdir}/{step}/params: cannot restore: {_describe(e)}") from e
    finally:
        mngr.close()
    out = {}
    for p, arr in jax.tree_util.tree_flatten_with_path(restored)[0]:
        key = tuple(str(getattr(k, "key", k)) for k in p)
        out[tuple(int(k) if k.isdigit() else k for k in key)] = arr
    return out


def read_json_item(path: str | Path, item: str, step: int | None = None) -> dict:
    ckdir, step = _pick_step(path, step)
    f = ckdir / str(step) / item / "metadata"
    if not f.exists():
        raise CheckpointError(f"{f}: missing")
    return read_item(ckdir, step, item)
