"""Failure timings of a 2-process run (``jtl launch``, 2 CPU processes x 1 device).

For each fault, process 1 of a tiny MLM run fails at step 2 (a fault hook loaded
through PYTHONPATH) and the launcher reports how long the other process took to
stop by itself: after ``kill`` (SIGKILL) that is JAX's heartbeat detection, after
``raise`` it is jtl's fail-fast exit plus the same detection. Prints one JSON line
per fault. Usage: ``python benchmarks/multihost_faults.py [--heartbeat 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = '''
import os, signal
if os.environ.get("JTL_PROCESS_ID") == "1":
    import jtl.run.loop as loop
    push = loop.StepLogger.push
    def faulty(self, step, *a, **k):
        if step == 2:
            if os.environ["JTL_BENCH_FAULT"] == "raise":
                raise RuntimeError("injected fault in process 1")
            os.kill(os.getpid(), signal.SIGKILL)
        return push(self, step, *a, **k)
    loop.StepLogger.push = faulty
'''
TINY = ["model.hidden=32", "model.layers=2", "model.heads=4", "model.mlp=64", "data.seq_len=32",
        "model.max_len=32", "data.max_examples=400", "data.tokenizer_vocab=300", "model.vocab_size=300",
        "train.batch_size=16", "train.progress=false", "train.steps=200", "mesh.data=2"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heartbeat", type=int, default=5)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(HOOK)
        for fault in ("kill", "raise"):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]),
                       JTL_BENCH_FAULT=fault)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "jtl.cli", "-q", "launch", "--processes", "2", "--", "train",
                                "tiny-mlm", *TINY, f"distributed.heartbeat_timeout={args.heartbeat}",
                                f"run_dir={tmp}/run-{fault}"], cwd=repo, env=env, capture_output=True,
                               text=True, timeout=600)
            wall = time.perf_counter() - t
            m = re.search(r"the last ended ([0-9.]+) s later", p.stdout)
            print(json.dumps({"fault": fault, "heartbeat_timeout_s": args.heartbeat, "exit_code": p.returncode,
                              "others_stopped_after_s": float(m.group(1)) if m else None,
                              "launch_wall_s": round(wall, 1), "load_avg": os.getloadavg()[0]}), flush=True)
            if m is None:
                print(p.stdout[-3000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
