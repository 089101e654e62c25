"""One writer per run directory: ``RUN_DIR/.lock`` holds the pid and host of the
process training into it. A second ``jtl train`` on the same run directory is
refused with a message naming the holder (otherwise it would silently replace the
first one's checkpoints, summary and config and interleave ``metrics.jsonl``).

A lock left by a process that is gone (same host, pid not running) is taken over;
a lock from another host is honoured until removed by hand (we cannot see its
processes). In a multi-process run only process 0 takes the lock.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import jax

from jtl.config import ConfigError

log = logging.getLogger("jtl")
NAME = ".lock"


class RunLocked(ConfigError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire(run_dir: Path) -> Path | None:
    """Take RUN_DIR/.lock (process 0 only); raises RunLocked if a live process holds it."""
    if jax.process_index() != 0:
        return None
    run_dir = Path(run_dir)
    path = run_dir / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held and held.get("host") == me["host"] and not _alive(int(held.get("pid", -1))):
                log.warning("%s: taking over the lock of process %s, which is gone", path, held.get("pid"))
                path.unlink(missing_ok=True)
                continue
            who = f"pid {held.get('pid')} on {held.get('host')}" if held else "an unknown process"
            raise RunLocked(f"run_dir={run_dir} is in use by {who} ({path}); two runs writing one run "
                            f"directory would overwrite each other. Wait for it, use another run_dir, or "
                            f"delete {path} if that process is gone")
        except OSError as e:  # read-only disk or parent, no permission, not a directory...
            raise ConfigError(f"run_dir={run_dir}: cannot write there ({e.strerror}: {e.filename}); "
                              f"choose a writable run_dir") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(f"{path}: could not take the run lock")


def release(path: Path | None) -> None:
    if path is None:
        return
    held = _holder(path)
    if held and held.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(run_dir: Path):
    path = acquire(run_dir)
    try:
        yield path
    finally:
        release(path)
