"""Bad files and run directories end in one clear error naming the path (and line)."""
from __future__ import annotations

import json

import pytest

from jtl import config as C
from jtl.config import ConfigError
from jtl.data.sources import DataError, read_rows


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".json"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, suffix):
    good = '{"text": "fine", "label": 0}' if suffix != ".txt" else "fine"
    bad = '{"text": "caf\xe9", "label": 1}' if suffix != ".txt" else "caf\xe9"
    if suffix == ".json":
        body = ("[\n" + good + ",\n" + bad + "\n]\n").encode("latin-1")
    else:
        body = (good + "\n" + good + "\n" + bad + "\n").encode("latin-1")  # é as one latin-1 byte
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(body)
    line = 3
    with pytest.raises(DataError, match=rf"rows\{suffix}:{line}: not UTF-8 text"):
        read_rows(str(path))


def test_malformed_csv_names_the_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\nfine,0\n\"unterminated,1\nx,1,2,3,4\n")
    with pytest.raises(DataError, match=r"rows\.csv: could not read it as CSV"):
        read_rows(str(path))


def test_unwritable_run_dir_is_a_config_error_naming_it(tmp_path):
    from jtl.run.lock import run_lock
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run_dir=.*file/run: cannot write there"):
        with run_lock(blocker / "run"):
            pass


def test_an_unwritable_predict_output_is_refused_before_the_model_loads(tmp_path):
    from jtl.finetune import predict_file
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a fine film"}\n')
    # run_dir does not even exist: the output is checked first, so nothing is loaded for nothing
    with pytest.raises(ConfigError, match=r"--output .*file/out\.jsonl: cannot write there"):
        predict_file(tmp_path / "no-such-run", rows, blocker / "out.jsonl")


def test_train_steps_zero_is_refused():
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        C.validate(C.Config().replace(**{"train.steps": 0}))
    C.validate(C.Config().replace(**{"train.steps": None}))  # null: train.epochs decides


def test_a_fresh_run_does_not_append_to_an_old_metrics_file(tmp_path):
    from jtl.metrics import MetricWriter
    w = MetricWriter(tmp_path, tensorboard=False)
    w.write(1, {"loss": 2.0})
    w.close()
    w = MetricWriter(tmp_path, tensorboard=False)  # resumed: appends
    w.write(2, {"loss": 1.5})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    w = MetricWriter(tmp_path, tensorboard=False, fresh=True)  # starts at step 0: old file kept aside
    w.write(1, {"loss": 3.0})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    old = [p for p in tmp_path.glob("metrics.*.jsonl")]
    assert len(old) == 1 and len(old[0].read_text().splitlines()) == 2


def test_a_mesh_smaller_than_the_machine_says_so(caplog):
    from jtl import sharding as S
    from jtl.config import MeshConfig
    with caplog.at_level("WARNING", logger="jtl"):
        mesh = S.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    assert mesh.size == 3
    assert "uses 3 of 8 devices; 5 stay idle" in caplog.text


def test_same_config_and_seed_give_the_same_run_in_fresh_processes(tmp_path, repo, monkeypatch):
    """A fresh process with another hash seed than this one, each training its own
    tokenizer: identical tokenizers and identical per-step losses."""
    import os
    import subprocess
    import sys

    from jtl.cli import main
    args = ["train", "tiny-mlm", "model.hidden=32", "model.layers=1", "model.heads=2", "model.mlp=64",
            "model.vocab_size=512", "data.tokenizer_vocab=500", "data.seq_len=32", "model.max_len=32",
            "train.batch_size=16", "data.max_examples=800", "train.steps=4", "train.log_every=1",
            "train.progress=false", "mesh.data=-1"]
    runs = [tmp_path / "here", tmp_path / "fresh"]
    mine = os.environ.get("PYTHONHASHSEED", "random")  # str hashing (and set order) differ
    env = {**os.environ, "PYTHONHASHSEED": "2" if mine == "1" else "1"}
    child = subprocess.Popen([sys.executable, "-m", "jtl.cli", "-q", *args, f"run_dir={runs[1]}"], cwd=repo,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monkeypatch.chdir(repo)
    assert main(["-q", *args, f"run_dir={runs[0]}"]) == 0
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out[-2000:]
    vocab = [json.loads((r / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"] for r in runs]
    assert vocab[0] == vocab[1]
    losses = [[m["loss"] for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
               if m["split"] == "train"] for r in runs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_a_second_sigterm_during_the_first_compile_exits_at_once(tmp_path, repo):
    """The first step compiles in native code, where Python handlers cannot run; the
    second SIGTERM must still end the process at once (143), not merge into the first
    and let the run continue to a preemption checkpoint (75)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"))  # a real compile
    proc = subprocess.Popen([sys.executable, "-m", "jtl.cli", "train", "tiny-mlm", f"run_dir={tmp_path / 'run'}",
                             "model.hidden=48", "model.layers=3", "model.heads=4", "model.mlp=96",
                             "data.max_examples=300", "data.tokenizer_vocab=300", "model.vocab_size=300",
                             "train.batch_size=8", "train.steps=50", "train.progress=false", "mesh.data=1"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "the first one compiles the step" in line:
                break
        else:
            raise AssertionError("the step loop never started:\n" + "".join(seen))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "second SIGTERM: exiting at once" in out and "preempted at step" not in out, out


def test_a_sigterm_before_the_step_loop_still_checkpoints_and_exits_75(tmp_path, repo):
    """A SIGTERM that arrives while the run is still starting (data read, model being
    born) used to kill the process with the default handler (-15): the command's guard
    now keeps it for the first step boundary, as a scheduler expects of exit code 75."""
    import os
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "jtl.cli", "train", "tiny-mlm", f"run_dir={tmp_path / 'run'}",
                             "model.hidden=32", "model.layers=1", "model.heads=2", "model.mlp=64",
                             "data.max_examples=300", "data.tokenizer_vocab=300", "model.vocab_size=300",
                             "train.batch_size=8", "train.steps=50", "train.progress=false", "mesh.data=1",
                             "checkpoint.enabled=true"],
                            cwd=repo, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "rows of" in line:  # the data is read; the model is not born yet
                break
        else:
            raise AssertionError("the run never read its data:\n" + "".join(seen))
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 75, out
    assert "preempted at step 1;" in out, out
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
