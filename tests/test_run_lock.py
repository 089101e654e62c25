"""One writer per run directory (RUN_DIR/.lock)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from jtl import config as C
from jtl.run import lock


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path):
    held = lock.acquire(tmp_path)
    assert json.loads(held.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(lock.RunLocked, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
        lock.acquire(tmp_path)
    lock.release(held)
    assert not held.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    held.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert lock.acquire(tmp_path) == held  # the holder is gone: taken over
    lock.release(held)


def test_train_on_a_run_dir_in_use_changes_nothing(tmp_path):
    from jtl.pretrain import pretrain
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / lock.NAME).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        (tmp_path / "summary.json").write_text('{"steps": 7}')
        cfg = C.load("tiny-mlm", [f"run_dir={tmp_path}", "data.train=examples/data/reviews_unlabelled.txt"])
        with pytest.raises(lock.RunLocked, match=f"pid {other.pid}"):
            pretrain(cfg)
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock.NAME, "summary.json"]
        assert (tmp_path / "summary.json").read_text() == '{"steps": 7}'
    finally:
        other.kill()
        other.wait()


def test_a_second_jtl_train_on_a_run_dir_in_use_exits_non_zero_naming_the_first(tmp_path, capsys):
    """Two real `jtl train` on one run dir: the first holds the lock, the second (the CLI,
    here in-process) exits 2 with a message naming the first's pid and host."""
    import time
    from pathlib import Path
    from jtl import cli
    repo = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "jtl.cli", "train", "tiny-mlm", f"run_dir={run}",
                              "train.steps=100000", "train.progress=false"], cwd=repo,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        holder = None
        while holder is None:
            assert first.poll() is None, f"the first run ended early: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first run never took the lock"
            try:
                holder = json.loads((run / lock.NAME).read_text())
            except (OSError, ValueError):  # not there yet, or being written
                time.sleep(0.2)
        assert holder["pid"] == first.pid
        rc = cli.main(["train", "tiny-mlm", f"run_dir={run}", "train.steps=3"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"jtl: error: run_dir={run} is in use by pid {first.pid} on {socket.gethostname()}" in err, err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
