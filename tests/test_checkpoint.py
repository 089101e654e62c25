"""Checkpoints: exact resume, preemption, kills during async saves, resharding,
NaN handling, mismatched/corrupted checkpoints, failing writes."""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jtl import checkpoint as ckpt
from jtl import config as C
from jtl import preemption
from jtl import sharding as S
from jtl.pretrain import pretrain
from jtl.tasks import TaskSpec, mlm_max_predictions
from jtl.train import abstract_state

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
TINY = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.mlp=64", "model.vocab_size=1024",
        "data.tokenizer_vocab=1000", "data.seq_len=32", "model.max_len=32", "train.batch_size=16",
        "data.max_examples=2000", f"train.steps={STEPS}", "train.progress=false", "train.log_every=1",
        f"data.train={REPO / 'examples/data/reviews_unlabelled.txt'}",
        "mesh.data=1", "mesh.fsdp=2"]  # sharded parameters on 2 devices (8 only make it slower)


def make_cfg(run_dir, *extra, tokenizer=None):
    over = TINY + [f"run_dir={run_dir}", "checkpoint.enabled=true", "checkpoint.every=4"]
    if tokenizer:
        over.append(f"data.tokenizer={tokenizer}")
    return C.load(str(REPO / "configs/tiny-mlm.yaml"), over + list(extra))


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            out[r["step"]] = r["loss"]
    return out


def spec_of(cfg):
    return TaskSpec(mask_id=0, max_predictions=mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob))


def fresh_state(cfg, mesh):
    """Abstract (params, opt) carrying the target shardings of ``mesh`` (nothing allocated)."""
    _, abstract, shardings, _ = abstract_state(cfg, spec_of(cfg), mesh, cfg.train.steps)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load(run_dir, cfg, mesh=None, **kw):
    mesh = mesh or S.make_mesh(cfg.mesh)
    return ckpt.resume(run_dir, fresh_state(cfg, mesh), cfg.to_dict(), **kw)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(ckpt._to_pure(state))]


def assert_same(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bit for bit


@pytest.fixture(scope="session")
def reference(tmp_path_factory, request):
    """An uninterrupted run: checkpoints at 4, 8 and the final 12 (8 and 12 kept).

    Trained once per test session: the pytest-xdist workers share it (the first builds
    it under a file lock, the others wait and read it). Tests only read it, or copy it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: its parent is this session's
        base = base.parent
    run = base / "checkpoint-reference"
    with FileLock(str(run) + ".lock"):
        if not (run / "summary.json").exists():
            if run.exists():
                shutil.rmtree(run)  # a build that died half-way
            pretrain(make_cfg(run))
    return run


def test_uninterrupted_run_layout(reference):
    ckdir = reference / "checkpoints"
    assert ckpt.valid_steps(ckdir) == [8, 12]  # keep=2, old ones moved to the trash and emptied
    assert not (ckdir / ckpt.TRASH).exists()
    meta = ckpt.read_json_item(reference, "meta")
    assert meta["family"] == "bert" and meta["step"] == 12 and meta["skipped_updates"] == 0
    assert ckpt.read_json_item(reference, "config")["model"]["hidden"] == 32
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))


def test_interrupt_and_resume_is_bit_exact(reference, tmp_path):
    """Stop at step 3 (not a save step), resume, stop at 8 (a save step), resume to
    the end: identical per-step losses, final params/optimizer state and data position.
    Dropout (0.1) and MLM masking draw from an RNG derived from the optimizer's step
    counter, so restoring the optimizer state restores the RNG stream too."""
    tok = reference / "tokenizer"
    cfg = make_cfg(tmp_path, tokenizer=tok)
    for k in (3, 8):
        def hook(step, guard, k=k):
            if step == k:
                guard.request()
        with pytest.raises(preemption.Preempted) as e:
            pretrain(cfg, on_step=hook)
        assert e.value.code == preemption.EXIT_PREEMPTED and e.value.step == k
        assert ckpt.valid_steps(tmp_path / "checkpoints")[-1] == k
    summary = pretrain(cfg)
    assert summary["resumed_from_step"] == 8
    assert losses(tmp_path) == losses(reference)
    got, want = load(tmp_path, cfg), load(reference, cfg)
    assert got[2] == want[2] == STEPS
    assert got[1] == want[1]  # data iterator position
    assert_same(got[0], want[0])


def test_fresh_start_moves_old_checkpoints_aside(reference, tmp_path):
    """checkpoint.resume=false: the old steps are moved aside (not deleted, not resumed)."""
    ckdir = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", ckdir)
    aside = ckpt.set_aside(ckdir)
    assert not ckdir.exists() and ckpt.valid_steps(aside) == [8, 12]
    assert ckpt.set_aside(ckdir) is None


def test_restore_onto_other_meshes(reference):
    """Saved on fsdp=2 (parameters split in two); restored onto fsdp=4 x tensor=2, 2x2x2 and one device."""
    cfg = make_cfg(reference)
    want = load(reference, cfg)[0]
    assert load(reference / "checkpoints" / "8", cfg)[2] == 8  # resume_from=<step dir>
    for shape, devices in [((1, 4, 2), None), ((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])]:
        mesh = S.make_mesh(shape, devices)
        state, _, step, _ = load(reference, cfg, mesh=mesh)
        assert step == STEPS
        assert_same(state, want)
        target = fresh_state(cfg, mesh)
        for got, tgt in zip(jax.tree.leaves(ckpt._to_pure(state)), jax.tree.leaves(ckpt._to_pure(target))):
            assert got.sharding.is_equivalent_to(tgt.sharding, got.ndim), shape
            assert len(got.sharding.device_set) == mesh.size


def test_nan_stop_keeps_last_finite_checkpoint(reference, tmp_path):
    cfg = make_cfg(tmp_path, "optim.lr=1e30", "optim.clip_norm=null", "checkpoint.every=1",
                   "train.steps=8", tokenizer=reference / "tokenizer")
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite"):
        pretrain(cfg)
    steps = ckpt.valid_steps(tmp_path / "checkpoints")
    assert steps and steps[-1] < 8
    got = load(tmp_path, cfg)  # resume() itself refuses non-finite states
    assert got[2] == steps[-1] and ckpt.all_finite(got[0])


def test_nan_skip_counts_and_saves_finite(reference, tmp_path):
    cfg = make_cfg(tmp_path, "optim.lr=1e30", "optim.clip_norm=null", "train.nan_policy=skip",
                   "train.steps=6", tokenizer=reference / "tokenizer")
    summary = pretrain(cfg)
    assert summary["train_skipped_updates"] > 0
    meta = ckpt.read_json_item(tmp_path, "meta")
    assert meta["step"] == 6 and meta["skipped_updates"] > 0
    assert ckpt.all_finite(load(tmp_path, cfg)[0])


def test_mismatched_config_is_refused_naming_params(reference):
    cfg = make_cfg(reference, "model.mlp=48")
    with pytest.raises(ckpt.IncompatibleCheckpoint) as e:
        load(reference, cfg, fallback=True)  # a mismatch is never a reason to fall back
    msg = str(e.value)
    assert "backbone.layers.up_w: checkpoint (1, 64, 32) vs model (1, 48, 32)" in msg
    assert "model.mlp: 64 -> 48" in msg
    other = make_cfg(reference).to_dict()
    other["model"] = {**other["model"], "family": "roberta"}
    with pytest.raises(ckpt.IncompatibleCheckpoint, match="model.family=bert.*model.family=roberta"):
        ckpt.resume(reference, fresh_state(make_cfg(reference), S.make_mesh((8, 1, 1))), other)


def test_corrupted_and_incomplete_checkpoints(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = make_cfg(run)
    data_files = sorted((run / "checkpoints/12/params/ocdbt.process_0/d").iterdir())
    for f in data_files:  # truncate the array data
        f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)checkpoints/12: cannot restore.*checkpoint.fallback=true "
                                                   r"to use the previous committed step 8"):
        load(run, cfg)
    state, _, step, _ = load(run, cfg, fallback=True)
    assert step == 8
    assert_same(state, load(reference, cfg, step=8)[0])
    # a half-deleted step (what an in-place delete killed half way leaves)
    shutil.rmtree(run / "checkpoints/12")
    (run / "checkpoints/8/opt/manifest.ocdbt").unlink()
    assert ckpt.step_problems(run / "checkpoints", 8)
    with pytest.raises(ckpt.CheckpointError, match="incomplete.*opt/manifest.ocdbt"):
        load(run, cfg)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint could be restored"):
        load(run, cfg, fallback=True)


def test_failing_write_loses_nothing(reference, tmp_path):
    """A write that fails (file size limit -> EFBIG, like a full disk) raises a clear error;
    the committed step stays intact and the failed one is never listed."""
    cfg = make_cfg(reference)
    state, data, _, _ = load(reference, cfg)
    mngr = ckpt.manager(tmp_path)
    assert ckpt.save(mngr, 1, state, cfg.to_dict(), data)
    ckpt.wait(mngr)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"saving step 2 .*failed.*latest is step 1"):
            ckpt.save(mngr, 2, state, cfg.to_dict(), data)
            ckpt.wait(mngr)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    mngr.close()
    assert ckpt.valid_steps(tmp_path) == [1]
    again, _, step, _ = load(tmp_path, cfg)
    assert step == 1
    assert_same(again, state)


# ---------------------------------------------------------------- real signals (subprocesses)

def _launch(run_dir, tok, steps=100000, every=1):
    cmd = [sys.executable, "-m", "jtl.cli", "-q", "train", str(REPO / "configs/tiny-mlm.yaml"),
           *TINY, f"train.steps={steps}", f"run_dir={run_dir}", "checkpoint.enabled=true",
           f"checkpoint.every={every}", f"data.tokenizer={tok}", "train.log_every=1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # keeps the 8 devices and the test XLA flags
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step_after(ckdir, after, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        steps = ckpt.valid_steps(ckdir, warn=False)
        if steps and steps[-1] > after:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError("training exited early:\n" + proc.stdout.read())
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_during_async_saves_then_sigterm(reference, tmp_path):
    """SIGKILL at a random moment while saves (every step) are in flight: the newest
    committed step restores. Then a resumed run gets SIGTERM: it checkpoints the current
    step and exits with EXIT_PREEMPTED. (benchmarks/kill_test.py repeats the kill.)"""
    tok, ckdir = reference / "tokenizer", tmp_path / "checkpoints"
    cfg = make_cfg(tmp_path)
    proc = _launch(tmp_path, tok, every=1)
    try:
        first = _wait_for_step_after(ckdir, 0, proc)
        time.sleep(random.Random().uniform(0.0, 1.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state, _, killed_at, _ = load(tmp_path, cfg)  # restore succeeds from a committed step
    assert killed_at >= first and ckpt.all_finite(state)

    proc = _launch(tmp_path, tok, every=1000)  # resumes; no periodic save near the stop
    try:
        t = time.time()
        for line in proc.stdout:  # wait until it resumed, then let it train a little
            if "resumed from" in line or time.time() - t > 120:
                break
        assert f"at step {killed_at}" in line, line
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == preemption.EXIT_PREEMPTED, out
    stopped = int(out.split("preempted at step ")[1].split(";")[0])
    assert stopped > killed_at and ckpt.valid_steps(ckdir)[-1] == stopped
    assert load(tmp_path, cfg)[2] == stopped


def test_retention_latest_every_k_and_best(tmp_path):
    """keep=2 latest + every 4th + the best by metric; the latest is never dropped for the best."""
    import jax.numpy as jnp
    state = ({"w": jnp.ones((4, 4))}, {"mu": jnp.zeros((4, 4))})
    mngr = ckpt.manager(tmp_path, keep=2, keep_every=4, best_metric="loss", best_mode="min")
    loss = {1: 5.0, 2: 1.0, 3: 3.0, 4: 9.0, 5: 8.0, 6: 7.0, 7: 10.0, 9: 11.0}
    for step, v in loss.items():
        assert ckpt.save(mngr, step, state, {"model": {"family": "bert"}}, metrics={"loss": v})
    ckpt.wait(mngr)
    assert not ckpt.save(mngr, 9, state, {})  # an existing step is not overwritten
    assert mngr.best_step() == 2 and mngr.latest_step() == 9
    mngr.close()
    assert ckpt.valid_steps(tmp_path) == [2, 4, 7, 9]


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_files(reference, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {f: (run / f).read_bytes() for f in ("summary.json", "config.yaml", "metrics.jsonl")}
    with caplog.at_level("INFO", logger="jtl"):
        summary = pretrain(make_cfg(run, "optim.lr=0.5"))
    assert summary == json.loads(before["summary.json"])
    assert {f: (run / f).read_bytes() for f in before} == before
    assert "optim.lr differ" in caplog.text and "the run is complete" in caplog.text
    assert ckpt.valid_steps(run / "checkpoints") == [8, 12]
