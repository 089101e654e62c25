"""Damaged checkpoints and failing writes: nothing lost, nothing silently wrong (issue 21).

* a fallback past a damaged latest step sets that step aside, so the retrained step
  is saved and a rerun works;
* bytes flipped in any array file are caught by the checksums recorded at save;
* a save into a read-only checkpoints dir ends the process promptly, non-zero.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from jtl import checkpoint as ckpt
from jtl.config import ConfigError
from jtl.pretrain import pretrain
from test_checkpoint import REPO, STEPS, TINY, assert_same, load, losses, make_cfg, reference  # noqa: F401


def _copy(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def _damage(path, offset=None, n=4):
    """Overwrite ``n`` bytes of ``path`` (in the middle by default) with their complement."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fallback_sets_the_damaged_step_aside_and_saves_the_new_one(reference, tmp_path):
    run = _copy(reference, tmp_path)
    for f in (run / "checkpoints/12/params/ocdbt.process_0/d").iterdir():
        f.write_bytes(f.read_bytes()[:20])  # truncated array data: step 12 cannot restore
    summary = pretrain(make_cfg(run, "checkpoint.fallback=true"))
    assert summary["resumed_from_step"] == 8
    ckdir = run / "checkpoints"
    assert ckpt.valid_steps(ckdir)[-1] == STEPS
    assert 8 in ckpt.valid_steps(ckdir)  # retention kept the clean step the run resumed from
    assert ckpt.verify_step(ckdir, 8) and ckpt.verify_step(ckdir, STEPS)
    aside = list((run / "checkpoints.damaged").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["12"]  # kept for inspection, never listed
    cfg = make_cfg(run)
    state, _, step, _ = load(run, cfg)  # the new step 12 restores without any fallback
    assert step == STEPS
    assert_same(state, load(reference, cfg)[0])  # retrained from 8: the same bits as before
    assert losses(run)[STEPS] == losses(reference)[STEPS]
    assert pretrain(cfg) == summary  # a rerun finds the complete run


def test_flipped_bytes_in_any_array_file_are_refused_naming_the_file(reference, tmp_path):
    run = _copy(reference, tmp_path)
    cfg = make_cfg(run)
    step_dir = run / "checkpoints/12"
    for s in ckpt.valid_steps(run / "checkpoints"):
        assert (run / "checkpoints" / str(s) / ckpt.CHECKSUMS).is_file(), s  # recorded at save
    files = sorted(f for item in ("params", "opt") for f in (step_dir / item).rglob("*") if f.is_file())
    assert any("/d/" in str(f) for f in files) and len(files) > 4
    for f in files:
        original = f.read_bytes()
        _damage(f)
        try:
            with pytest.raises(ckpt.CheckpointError, match=f"{f}: checksum mismatch"):
                load(run, cfg)
        finally:
            f.write_bytes(original)
    data = next((step_dir / "params/ocdbt.process_0/d").iterdir())
    _damage(data, offset=len(data.read_bytes()) - 8)
    state, _, step, _ = load(run, cfg, fallback=True)  # the previous, intact step
    assert step == 8
    assert_same(state, load(reference, cfg, step=8)[0])
    with pytest.raises(ckpt.CheckpointError, match=f"{data}: checksum mismatch"):  # init_from, eval
        ckpt.restore_params(run, load(reference, cfg)[0][0], step=12)



def test_init_from_a_checkpoint_that_lacks_some_of_the_models_parameters_is_refused_naming_them(reference, tmp_path):
    """A parameter the model has but the checkpoint lacks used to keep its random init, silently
    (a backbone pretrained with another layout gave a half-transferred model)."""
    from test_checkpoint import fresh_state
    import jtl.sharding as S
    cfg = make_cfg(reference, "model.type_vocab=3")  # token-type embeddings: (3, 32) vs (2, 32)
    with pytest.raises(ckpt.CheckpointError, match=r"backbone\.embed\.types: checkpoint \(2, 32\) vs model \(3, 32\)"):
        ckpt.restore_params(reference, fresh_state(cfg, S.make_mesh(cfg.mesh))[0], prefix=("backbone",))
    abstract = fresh_state(make_cfg(reference), S.make_mesh(cfg.mesh))[0]
    saved_without_types = tmp_path / "no-types"  # a run whose encoder has no token-type embeddings
    pretrain(make_cfg(saved_without_types, "model.type_vocab=0", "train.steps=1", "checkpoint.every=1",
                      tokenizer=reference / "tokenizer"))
    with pytest.raises(ckpt.CheckpointError, match=r"lacks 1 parameter\(s\) this model has: backbone\.embed\.types"):
        ckpt.restore_params(saved_without_types, abstract, prefix=("backbone",))

def _without_root_override():
    """preexec_fn: as root, give up the capabilities that let root write anywhere
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so file modes apply to the child too."""
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: gone from the child after exec


def _can_write(path) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"open({str(path / 'probe')!r}, 'w')"],
                           preexec_fn=_without_root_override, capture_output=True)
    (path / "probe").unlink(missing_ok=True)
    return probe.returncode == 0


def test_a_failed_save_exits_promptly_and_non_zero(reference, tmp_path):
    """A read-only checkpoints dir: the save error is printed and the process exits at
    once with code 2 (it used to wait ~300 s in Orbax's writer threads)."""
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    ckdir.chmod(0o555)
    try:
        if _can_write(ckdir):
            pytest.skip("chmod does not stop this user from writing")
        cmd = [sys.executable, "-m", "jtl.cli", "-q", "train", str(REPO / "configs/tiny-mlm.yaml"), *TINY,
               "train.steps=8", f"run_dir={run}", "checkpoint.enabled=true", "checkpoint.every=4",
               f"data.tokenizer={reference / 'tokenizer'}"]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                                  preexec_fn=_without_root_override, capture_output=True, text=True,
                                  timeout=180)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            raise AssertionError(f"jtl train did not exit after the failed save:\n{err[-3000:]}") from None
    finally:
        ckdir.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(f"jtl: error: saving (a checkpoint|step 4) to {re.escape(str(ckdir))} failed: "
                     f"PermissionError", proc.stderr), proc.stderr[-3000:]
    assert not ckpt.all_steps(ckdir)


def test_resume_from_another_run_takes_its_tokenizer_and_a_refused_resume_writes_nothing(reference, tmp_path):
    """checkpoint.resume_from=OTHER_RUN pairs the other run's weights with the other run's
    tokenizer (not a new one trained here); a resume refused as incompatible leaves the
    run's config.yaml as it was (run files are written only after the resume succeeded)."""
    new = tmp_path / "new"
    # A tokenizer trained here would differ (another vocabulary size): it must not be trained.
    summary = pretrain(make_cfg(new, f"checkpoint.resume_from={reference}", f"train.steps={STEPS + 2}",
                                "data.tokenizer_vocab=900"))
    assert summary["resumed_from_step"] == STEPS
    assert (new / "tokenizer" / "tokenizer.json").read_bytes() == \
        (reference / "tokenizer" / "tokenizer.json").read_bytes()
    run = _copy(reference, tmp_path)
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "tokenizer/tokenizer.json")}
    other = tmp_path / "other-tokenizer"  # a tokenizer the refused run names: it must not replace the run's
    from jtl.data.tokenizer import train_tokenizer
    train_tokenizer(["a few words of other text", "and some more words"], 40, kind="wordpiece").save_pretrained(
        str(other))
    with pytest.raises(ckpt.IncompatibleCheckpoint, match="model.mlp: 64 -> 48"):
        pretrain(make_cfg(run, "model.mlp=48", f"data.tokenizer={other}"))
    assert {f: (run / f).read_bytes() for f in before} == before
    # A bare checkpoints/ copy (no tokenizer/ beside it): refused, not paired with a new tokenizer.
    bare = tmp_path / "bare"
    shutil.copytree(reference / "checkpoints", bare / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoint\.resume_from=.*bare: no tokenizer/ .*set data\.tokenizer"):
        pretrain(make_cfg(tmp_path / "fresh", f"checkpoint.resume_from={bare}"))
    assert not (tmp_path / "fresh" / "tokenizer").exists()
