"""SIGKILL ``jtl train`` at random moments while async checkpoints are in flight.

    python benchmarks/kill_test.py [--kills 10] [--steps 600] [--out benchmarks/results/kill_test.json]

One run directory; each trial starts (or resumes) ``jtl train`` with a save every
step, waits until it committed a step newer than the last trial's, sleeps a random
0-2 s and SIGKILLs it. This process (a fresh one, not the killed one) then restores
the newest committed step with ``jtl.checkpoint.resume`` and records what was left
on disk (tmp dirs of the save in flight, the trash, incomplete steps). At the end
the run is resumed to completion and its final parameters, optimizer state and
per-step losses are compared bit for bit with an uninterrupted run of the same
config: kills and resumes must not change the result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.mlp=64", "model.vocab_size=1024",
        "data.tokenizer_vocab=1000", "data.seq_len=32", "model.max_len=32", "train.batch_size=16",
        "data.max_examples=2000", "train.progress=false", "train.log_every=1",
        f"data.train={REPO / 'examples/data/reviews_unlabelled.txt'}", "checkpoint.enabled=true"]


def command(run_dir: Path, steps: int, every: int, tokenizer: Path | None) -> list[str]:
    extra = [f"data.tokenizer={tokenizer}"] if tokenizer else []
    return [sys.executable, "-m", "jtl.cli", "-q", "train", str(REPO / "configs/tiny-mlm.yaml"), *TINY,
            f"train.steps={steps}", f"run_dir={run_dir}", f"checkpoint.every={every}", *extra]


def losses(run_dir: Path) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if r["split"] == "train":
            out[r["step"]] = r["loss"]  # a resumed step overwrites what a killed run logged
    return out


def restore(run_dir: Path, steps: int):
    import jax
    from jtl import checkpoint as ckpt
    from jtl import config as C
    from jtl import sharding as S
    from jtl.tasks import TaskSpec, mlm_max_predictions
    from jtl.train import abstract_state
    cfg = C.load(str(REPO / "configs/tiny-mlm.yaml"), TINY + [f"train.steps={steps}", f"run_dir={run_dir}"])
    spec = TaskSpec(mask_id=0, max_predictions=mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob))
    _, abstract, shardings, _ = abstract_state(cfg, spec, S.make_mesh(cfg.mesh), steps)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return ckpt.resume(run_dir, target, cfg.to_dict())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max-delay", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/kill_test.json"))
    args = ap.parse_args(argv)
    import jax
    import numpy as np
    from jtl import checkpoint as ckpt

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="jtl_kill_"))
    ref, run = root / "reference", root / "killed"
    t0 = time.time()
    subprocess.run(command(ref, args.steps, 100, None), cwd=REPO, check=True, capture_output=True)
    tok = ref / "tokenizer"
    print(f"reference run: {time.time() - t0:.0f} s", flush=True)
    trials, last = [], 0
    for i in range(args.kills):
        proc = subprocess.Popen(command(run, args.steps, 1, tok), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                steps = ckpt.valid_steps(run / "checkpoints", warn=False)
                if steps and steps[-1] > last:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"trial {i}: training exited (rc {proc.returncode}) before a new step")
                time.sleep(0.05)
            delay = rng.uniform(0, args.max_delay)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckdir = run / "checkpoints"
        left = sorted(p.name for p in ckdir.iterdir())
        listed = ckpt.all_steps(ckdir)
        try:
            state, _, step, _ = restore(run, args.steps)
            ok, err = bool(ckpt.all_finite(state)), None
        except Exception as e:  # recorded, counted as a failure
            ok, step, err = False, None, f"{type(e).__name__}: {e}"
        trials.append({"trial": i, "delay_s": round(delay, 3), "listed_steps": listed, "restored_step": step,
                       "ok": ok, "error": err, "tmp_dirs": [n for n in left if "tmp" in n],
                       "trash_left": ckpt.TRASH in left,
                       "incomplete_steps": [s for s in listed if ckpt.step_problems(ckdir, s)]})
        print(json.dumps(trials[-1]), flush=True)
        last = step if step is not None else last
        if last >= args.steps:
            break
    # finish the run and compare with the uninterrupted one
    subprocess.run(command(run, args.steps, 1, tok), cwd=REPO, check=True, capture_output=True)
    a, b = restore(run, args.steps), restore(ref, args.steps)
    same = all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(ckpt._to_pure(a[0])), jax.tree.leaves(ckpt._to_pure(b[0]))))
    la, lb = losses(run), losses(ref)
    common = sorted(set(la) & set(lb))
    losses_same = all(la[k] == lb[k] for k in common) and len(common) >= 0.95 * len(lb)
    result = {"kills": len(trials), "restored_ok": sum(t["ok"] for t in trials),
              "with_tmp_dir_left": sum(bool(t["tmp_dirs"]) for t in trials),
              "with_trash_left": sum(t["trash_left"] for t in trials),
              "with_incomplete_step_listed": sum(bool(t["incomplete_steps"]) for t in trials),
              "final_step": a[2], "final_state_bit_identical": same,
              "losses_bit_identical": losses_same, "loss_steps_compared": len(common),
              "data_position_identical": a[1] == b[1], "wall_s": round(time.time() - t0, 1),
              "trials": trials}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=2))
    ok = result["restored_ok"] == len(trials) and same and losses_same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
