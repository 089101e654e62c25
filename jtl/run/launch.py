"""``jtl launch``: N local processes of one jtl command, joined by ``jax.distributed``.

``jtl launch --processes 2 --devices-per-process 4 -- train CONFIG k=v`` starts
``jtl train CONFIG k=v`` twice on this machine as processes 0 and 1 of one run
(CPU devices, a free coordinator port on 127.0.0.1), prefixes every output line
with ``[rank]`` and waits. It is how multi-host behaviour is tried on a laptop
and how the tests run it; on a real cluster every host runs the jtl command itself
(``srun``, ``mpirun``, a TPU VM's ``--worker=all``: see ``jtl.run.distributed``).

* Exit code: 0 when every process succeeded, else the code of the first process that
  failed (a signal N counts as 128+N; of processes found ended at the same moment, one
  killed by a signal counts as first: the others' errors follow from it); 75 when the run was preempted (every process
  saved the same step).
* When a process fails, the others are given ``--grace`` seconds (default: twice the
  run's ``distributed.heartbeat_timeout`` plus 10 s) to end by themselves (JAX's
  heartbeat check aborts them) and are then killed; the launcher names the process
  that failed first.
* SIGTERM / SIGINT to the launcher is forwarded to every process as SIGTERM, as a
  cluster preempting the job would do: they agree on a step, checkpoint it and exit 75.
  A second signal kills them.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# gloo prints a line per communicator from C++ threads (two can interleave on one line)
NOISE = re.compile(r"\[Gloo\] Rank|is connected to \d+ peer ranks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(rank: int, n: int, port: int, devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # loopback gRPC
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(JTL_COORDINATOR=f"127.0.0.1:{port}", JTL_NUM_PROCESSES=str(n), JTL_PROCESS_ID=str(rank),
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), PYTHONUNBUFFERED="1")
    return env


def _pump(rank: int, stream, out, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        if NOISE.search(line) or not line.strip():  # gloo's per-communicator lines; progress redraws
            continue
        with lock:
            out.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
            out.flush()


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _heartbeat(command: list[str]) -> int:
    for item in command:
        if item.startswith("distributed.heartbeat_timeout="):
            try:
                return int(item.split("=", 1)[1])
            except ValueError:
                pass
    from jtl.config import DistributedConfig
    return DistributedConfig.heartbeat_timeout


def launch(command: list[str], processes: int, devices: int = 1, grace: float | None = None,
           out=None) -> int:
    """Run ``jtl COMMAND`` as ``processes`` local processes; the exit code (see module doc)."""
    out = out or sys.stdout
    if processes < 1 or devices < 1:
        raise SystemExit("jtl launch: --processes and --devices-per-process must be >= 1")
    if not command:
        raise SystemExit("jtl launch: give the jtl command after --, e.g. jtl launch --processes 2 -- "
                         "train CONFIG")
    grace = 2 * _heartbeat(command) + 10 if grace is None else grace
    port = free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for rank in range(processes):
        p = subprocess.Popen([sys.executable, "-m", "jtl.cli", *command], env=child_env(rank, processes, port,
                             devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(rank, p.stdout, out, lock), daemon=True)
        t.start()
        pumps.append(t)
    signals_seen = []

    def forward(signum, frame):
        signals_seen.append(signum)
        sig = signal.SIGTERM if len(signals_seen) == 1 else signal.SIGKILL
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, forward)
    first_failure, deadline, failed_at, ended_at = None, None, None, time.monotonic()
    try:
        while True:
            codes = [p.poll() for p in procs]
            # A death by signal first: a peer's "connection reset" error seen in the same poll
            # is its consequence, not the cause.
            for rank, rc in sorted(enumerate(codes), key=lambda x: (x[1] is None or x[1] >= 0, x[0])):
                if rc not in (None, 0, 75) and first_failure is None:  # 75: preempted, the others follow
                    first_failure = (rank, rc)
                    failed_at = time.monotonic()
                    deadline = failed_at + grace
                    with lock:
                        out.write(f"jtl launch: process {rank} ended ({_describe(rc)}); waiting up to "
                                  f"{grace:.0f} s for the other processes to stop\n")
                        out.flush()
            if all(rc is not None for rc in codes):
                ended_at = time.monotonic()
                break
            if deadline is not None and time.monotonic() > deadline:
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        with lock:
                            out.write(f"jtl launch: killing process {rank}, still running {grace:.0f} s "
                                      f"after process {first_failure[0]} failed\n")
                        p.kill()
                deadline = None
            time.sleep(0.1)
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if first_failure is None:
        bad = [(r, rc) for r, rc in enumerate(codes) if rc != 0]
        if not bad:
            return 0
        first_failure = bad[0]
    rank, rc = first_failure
    if all(c == 75 for c in codes):
        out.write(f"jtl launch: preempted: all {processes} processes saved the same step; run the same "
                  f"command again to resume\n")
        return 75
    what = ("fix the error it printed, then rerun" if rc == 2 else
            "rerun the same command to resume from the last checkpoint (if checkpoint.enabled)")
    after = f", the last ended {ended_at - failed_at:.1f} s later" if failed_at is not None else ""
    out.write(f"jtl launch: process {rank} of {processes} failed first ({_describe(rc)}){after}; exit codes "
              f"{codes}: {what}\n")
    out.flush()
    return _code(rc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jtl launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", "-n", type=int, required=True)
    parser.add_argument("--devices-per-process", "-d", type=int, default=1,
                        help="simulated CPU devices per process (default 1)")
    parser.add_argument("--grace", type=float, default=None,
                        help="seconds the others get after one process fails before they are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the jtl command, e.g. train CONFIG")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(command, args.processes, args.devices_per_process, args.grace)
