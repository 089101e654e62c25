"""Multi-process runs with real processes: ``jtl launch`` starts 2 local processes x 2
CPU devices joined by ``jax.distributed`` (gloo collectives), as the hosts of a pod
slice would run. Checked against a single process on the same global mesh shape."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jtl.cli import main

TINY = ["model.hidden=32", "model.layers=2", "model.heads=4", "model.mlp=64", "data.seq_len=32",
        "model.max_len=32", "data.max_examples=400", "data.tokenizer_vocab=300", "model.vocab_size=300",
        "train.batch_size=16", "train.progress=false", "optim.lr=2e-3", "optim.warmup_steps=2",
        "mesh.data=2", "mesh.fsdp=2", "distributed.heartbeat_timeout=3"]


def launch(args, cwd, env_extra=None, devices=2, timeout=240):
    """``jtl launch --processes 2 --devices-per-process D -- ARGS``: (rc, output)."""
    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, "-m", "jtl.cli", "launch", "--processes", "2",
                        "--devices-per-process", str(devices), "--grace", "90", "--", *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def train_losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"}


def test_two_processes_train_as_one_and_resume_on_one(tmp_path, repo, monkeypatch):
    two, ref = tmp_path / "two", tmp_path / "ref"
    # FSDP across the processes: each host holds half of every parameter and moment
    common = ["tiny-mlm", *TINY, "mesh.data=1", "train.steps=6", "train.log_every=1", "checkpoint.enabled=true",
              "checkpoint.every=3", "checkpoint.keep=3"]
    rc, out = launch(["train", *common, f"run_dir={two}"], repo, devices=1)
    assert rc == 0, out
    # every process speaks, with its rank; the summary is printed once, by process 0
    assert "[0] " in out and "[1] " in out and out.count('"steps": 6') == 1, out
    assert "[Gloo]" not in out
    # each process tokenized half of the documents (jtl.data.lm.tokenize_all) and gathered the rest
    halves = {int(r): (int(k), int(n)) for r, k, n in
              re.findall(r"\[(\d)\] .*process \1 tokenized (\d+) of (\d+) documents", out)}
    assert sorted(halves) == [0, 1] and halves[0][0] + halves[1][0] == halves[0][1] == halves[1][1], out
    assert halves[0][0] < halves[0][1]
    # one writer: one metrics line per logged step, one config, one tokenizer
    lines = [json.loads(x) for x in open(two / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (two / "config.yaml").is_file() and (two / "tokenizer" / "tokenizer.json").is_file()
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 6

    # the same global batches and the same numbers as one process with 2 devices
    monkeypatch.chdir(repo)
    assert main(["train", *common, f"run_dir={ref}"]) == 0
    a, b = train_losses(two), train_losses(ref)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert summary["train_real_tokens"] == json.loads((ref / "summary.json").read_text())["train_real_tokens"]

    # the 2-process checkpoint restores in one process on 8 devices (another mesh and
    # process count), equal to the 1-process run's, data position included
    from jtl import checkpoint as ckpt
    from jtl import config as C
    from jtl import sharding as S
    from test_checkpoint import fresh_state
    cfg = C.load(common[0], common[1:] + ["mesh.data=-1", "mesh.fsdp=1"])
    mesh = S.make_mesh(cfg.mesh)
    got = ckpt.resume(two / "checkpoints", fresh_state(cfg, mesh), cfg.to_dict(), step=3)
    want = ckpt.resume(ref / "checkpoints", fresh_state(cfg, mesh), cfg.to_dict(), step=3)
    assert got[1] == want[1] and got[2] == want[2] == 3  # data iterator state, step
    import jax
    import numpy as np
    pairs = list(zip(jax.tree.leaves(ckpt._to_pure(got[0])), jax.tree.leaves(ckpt._to_pure(want[0]))))
    assert len(pairs) > 10
    for x, y in pairs:
        assert x.sharding.mesh.size == 8
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_a_one_process_checkpoint_continues_on_two_processes_with_data_x_fsdp(tmp_path, repo, monkeypatch):
    """The other direction of the first test, on a mixed mesh: 1 process x 4 devices
    trains 6 steps; 2 processes x 2 devices (data=2 across the processes, fsdp=2 inside
    each) restore its step-3 checkpoint (params, optimizer, data position) and train steps
    4-6 with the uninterrupted run's losses. One launch checks both."""
    ref, two = tmp_path / "ref", tmp_path / "two"
    common = ["tiny-mlm", *TINY, "train.steps=6", "train.log_every=1", "checkpoint.enabled=true",
              "checkpoint.every=3", "checkpoint.keep=3"]  # TINY: mesh.data=2 mesh.fsdp=2
    monkeypatch.chdir(repo)
    assert main(["train", *common, f"run_dir={ref}"]) == 0
    rc, out = launch(["train", *common, f"run_dir={two}", f"checkpoint.resume_from={ref / 'checkpoints' / '3'}"],
                     repo, devices=2)
    assert rc == 0, out
    assert json.loads((two / "summary.json").read_text())["resumed_from_step"] == 3
    a, b = train_losses(two), train_losses(ref)
    assert sorted(a) == [4, 5, 6], a
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_two_process_fine_tuning_counts_every_validation_example_once(tmp_path, repo, monkeypatch):
    from test_finetune import TINY as FT, cls_rows, write_jsonl
    d = tmp_path / "data"
    d.mkdir()
    run = tmp_path / "run"
    keys = [*FT, "task.kind=classification", "train.steps=3", "train.eval_batch_size=8", "mesh.data=2",
            "distributed.heartbeat_timeout=3", f"run_dir={run}",
            f"data.train={write_jsonl(d / 'train.jsonl', cls_rows(64, 0))}",
            f"data.validation={write_jsonl(d / 'val.jsonl', cls_rows(37, 1))}"]
    (d / "cfg.yaml").write_text("name: two-process-classification\n")
    rc, out = launch(["train", str(d / "cfg.yaml"), *keys], repo, devices=1)
    assert rc == 0, out
    final = json.loads((run / "summary.json").read_text())["final"]["validation"]
    assert final["n"] == 37  # 37 rows over 2 processes, batches of 8: none lost or doubled
    assert abs(final["accuracy"] * 37 - round(final["accuracy"] * 37)) < 1e-6
    # one process on all 8 devices scores the checkpoint the same way
    from jtl.finetune import evaluate_run
    monkeypatch.chdir(repo)
    ev = evaluate_run(str(run), None, [], split="validation")
    assert ev["n"] == 37
    assert ev["accuracy"] == pytest.approx(final["accuracy"])
    assert ev["loss"] == pytest.approx(final["loss"], rel=1e-4)


FAULT = textwrap.dedent("""
    # Test-only fault injection, loaded by every process of the launch (PYTHONPATH).
    import os, signal
    if os.environ.get("JTL_PROCESS_ID") == "1":
        import jtl.run.loop as loop
        push = loop.StepLogger.push
        def faulty(self, step, *a, **k):
            if step == 2:
                what = os.environ["JTL_TEST_FAULT"]
                if what == "raise":
                    raise RuntimeError("injected fault in process 1")
                os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[what])
            return push(self, step, *a, **k)
        loop.StepLogger.push = faulty
""")


@pytest.mark.parametrize("fault", ["raise", "kill", "term"])
def test_a_failing_process_ends_the_run_promptly(tmp_path, repo, fault):
    """A process that raises exits at once with its traceback; one killed (SIGKILL) makes
    the others abort on JAX's heartbeat, not hang; SIGTERM to one process (a preempted
    host) makes every process checkpoint the same step and exit 75."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)
    run = tmp_path / "run"
    args = ["train", "tiny-mlm", *TINY, "mesh.fsdp=1", "train.steps=200", "train.log_every=1",
            "checkpoint.enabled=true", f"run_dir={run}"]
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "JTL_TEST_FAULT": fault}
    rc, out = launch(args, repo, env, devices=1)
    # the others stopped by themselves (JAX's heartbeat / preemption sync), not by the launcher
    assert "jtl launch: killing process" not in out, out
    if fault == "raise":
        assert rc == 1, out
        assert "[1] RuntimeError: injected fault in process 1" in out, out
        assert "process 1 of 2 failed" in out
    elif fault == "kill":
        assert rc == 128 + 9, out
        assert "process 1 ended (killed by SIGKILL)" in out, out
        assert "rerun the same command to resume" in out.lower()
    else:
        assert rc == 75, out
        stops = [line for line in out.splitlines() if "preempted at step" in line and "exiting" in line]
        assert len(stops) == 2 and len({s.split("preempted at step ")[1].split(";")[0] for s in stops}) == 1, out
        step = int(stops[0].split("preempted at step ")[1].split(";")[0])
        assert (run / "checkpoints" / str(step)).is_dir()  # resuming it: the first test


def test_a_peer_that_never_arrives_ends_the_run_saying_why(tmp_path, repo):
    """Process 0 of 2 alone: JAX aborts it after distributed.initialization_timeout (not a
    catchable error), and jtl has said beforehand what that means, naming the coordinator."""
    from jtl.run.launch import child_env, free_port
    port = free_port()
    env = child_env(0, 2, port, 1)
    p = subprocess.run([sys.executable, "-m", "jtl.cli", "train", "tiny-mlm", *TINY,
                        "distributed.initialization_timeout=2", f"run_dir={tmp_path / 'run'}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert f"did not reach the coordinator 127.0.0.1:{port}" in p.stderr, p.stderr
    assert "all 2 processes" in p.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_distributed_plan_from_config_and_environment(monkeypatch):
    from jtl.config import ConfigError, DistributedConfig
    from jtl.run.distributed import plan
    for k in ("JTL_COORDINATOR", "JTL_NUM_PROCESSES", "JTL_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
              "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert plan(DistributedConfig()) is None  # a plain run: one process, no jax.distributed
    monkeypatch.setenv("JTL_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JTL_NUM_PROCESSES", "4")
    monkeypatch.setenv("JTL_PROCESS_ID", "3")
    got = plan(DistributedConfig(heartbeat_timeout=7))
    assert (got["coordinator_address"], got["num_processes"], got["process_id"],
            got["heartbeat_timeout_seconds"]) == ("10.0.0.1:1234", 4, 3, 7)
    assert plan(DistributedConfig(process_id=1))["process_id"] == 1  # the config key wins
    assert plan(DistributedConfig(enabled=False)) is None
    with pytest.raises(ConfigError, match=r"process id 5 is outside \[0, 4\)"):
        plan(DistributedConfig(process_id=5))
    monkeypatch.setenv("JTL_NUM_PROCESSES", "1")
    monkeypatch.setenv("JTL_PROCESS_ID", "0")
    assert plan(DistributedConfig()) is None  # one process: nothing to join
    monkeypatch.delenv("JTL_PROCESS_ID")
    monkeypatch.setenv("JTL_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="distributed.process_id"):
        plan(DistributedConfig())
    monkeypatch.delenv("JTL_COORDINATOR")
    with pytest.raises(ConfigError, match="no coordinator"):
        plan(DistributedConfig())
    monkeypatch.setenv("JTL_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JTL_NUM_PROCESSES"):
        plan(DistributedConfig())
    monkeypatch.delenv("JTL_NUM_PROCESSES")
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    got = plan(DistributedConfig())
    assert got is not None and "coordinator_address" not in got and "slurm" in got["_how"]


def test_tensor_axis_across_processes_is_detected():
    """data/fsdp may span hosts; a tensor group split over processes is warned about."""
    import numpy as np
    from types import SimpleNamespace as D

    from jtl.sharding import tensor_spans_processes
    devs = np.array([D(process_index=p) for p in (0, 0, 1, 1)], dtype=object)
    assert not tensor_spans_processes(devs.reshape(2, 1, 2))  # tensor=2 inside each process
    assert not tensor_spans_processes(devs.reshape(1, 4, 1))  # fsdp over both processes
    assert tensor_spans_processes(devs.reshape(1, 1, 4))  # tensor=4 over two processes
    assert tensor_spans_processes(devs[[0, 2, 1, 3]].reshape(1, 2, 2))
