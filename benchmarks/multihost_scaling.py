"""What crossing processes costs: one MLM model trained by 2 processes x 4 CPU devices
(``jtl launch``, gloo collectives between the processes) against 1 process x 8 devices,
on the same global mesh shape, batch and data.

    .venv/bin/python benchmarks/multihost_scaling.py --rounds 3 --out benchmarks/results/multihost
    .venv/bin/python benchmarks/multihost_scaling.py --small --rounds 1 --out /tmp/mh   # a few minutes

Two parts:

* **tokens/s**: every round runs the real ``jtl train`` once per mesh and side (1 x 8 and
  P x D), the order rotating each round. A run trains ``(1 + --windows) * --window``
  steps; its first window (compilation, first steps) is dropped and its tokens/s is the
  global batch's token slots (B x seq_len) over the mean step time of the other windows,
  read from ``metrics.jsonl``. The report gives each side's median over rounds and the
  ratio P x D / 1 x 8 (median [min-max] of the rounds' ratios). The machine's quietness
  while timing is recorded (``jtl.bench.Quiet``): a run that was not quiet is no figure.
* **collective bytes per step** (deterministic, not a timing): the train step compiled for
  each mesh on 8 devices, and the operand bytes per device of its all-reduce / all-gather
  / reduce-scatter / collective-permute / all-to-all ops (``jtl.bench.collectives``), with
  the share whose device groups span processes when the 8 devices are P processes x D
  (``jtl.sharding.make_mesh`` lays out ``jax.devices()`` process by process, so logical
  device i lives on process i // D): the bytes that cross the network between hosts.

Meshes (``--meshes``): ``data`` (8, 1, 1), ``fsdp`` (1, 8, 1) and ``hybrid``
(P, D, 1): data parallel across the processes, FSDP inside each.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jtl import bench  # noqa: E402

# tiny-mlm (hidden 128, 4 heads, mlp 512) made a little deeper and wider in tokens, so that
# a step is mostly compute; --small keeps the preset's 2 layers and short rows.
SIZES = {
    "default": ["model.layers=4", "data.seq_len=128", "model.max_len=128", "train.batch_size=64",
                "data.max_examples=8000"],
    "small": ["model.layers=2", "data.seq_len=64", "model.max_len=64", "train.batch_size=32",
              "data.max_examples=3000", "data.tokenizer_vocab=2048", "model.vocab_size=2048"],
}


def meshes(names: list[str], processes: int, per: int) -> dict:
    n = processes * per
    known = {"data": (n, 1, 1), "fsdp": (1, n, 1), "hybrid": (processes, per, 1)}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"--meshes: unknown {unknown}; known: {', '.join(known)}")
    return {m: known[m] for m in names}


def mesh_keys(shape) -> list[str]:
    return [f"mesh.{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), shape)]


def run_side(single: bool, args, overrides: list[str], tokens: int, run_dir: Path, env: dict) -> float:
    """One ``jtl train`` run, in 1 process (``single``) or launched as P processes; its
    tokens/s (``tokens`` = B x seq_len per step) after the first window."""
    steps = (1 + args.windows) * args.window
    train = ["train", "tiny-mlm", *overrides, f"train.steps={steps}", f"train.log_every={args.window}",
             "train.progress=false", f"run_dir={run_dir}"]
    env = dict(env)
    if single:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.processes * args.devices}".strip()
        cmd = [sys.executable, "-m", "jtl.cli", "-q", *train]
    else:
        cmd = [sys.executable, "-m", "jtl.cli", "-q", "launch", "--processes", str(args.processes),
               "--devices-per-process", str(args.devices), "--", *train]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    if p.returncode != 0:
        raise SystemExit(f"run failed (exit {p.returncode}): {' '.join(cmd)}\n{(p.stdout + p.stderr)[-4000:]}")
    rows = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "train"]
    timed = [r["step_time"] for r in rows if r["step"] > args.window]
    if len(timed) != args.windows:
        raise SystemExit(f"{run_dir}/metrics.jsonl: expected {args.windows} timed windows, found {len(timed)}")
    return tokens / statistics.mean(timed)


def collective_table(cfg_overrides: list[str], shapes: dict, processes: int, per: int) -> dict:
    """{mesh: {op: {count, operand_bytes, cross_process_operand_bytes, ...}}} from the HLO."""
    from jtl import config
    from jtl import sharding as S
    out = {}
    for name, shape in shapes.items():
        cfg = config.load("tiny-mlm", [*cfg_overrides, *mesh_keys(shape)])
        res = bench.analyze(cfg, S.make_mesh(cfg.mesh), process_of=[i // per for i in range(processes * per)])
        out[name] = {op: c for op, c in res["collectives"].items() if c["count"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="devices per process (the other side: 1 x P*D)")
    p.add_argument("--meshes", default="data,fsdp,hybrid")
    p.add_argument("--small", action="store_true", help="the small model (a check that it runs, in minutes)")
    p.add_argument("--override", action="append", default=[], help="more key=value for every run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=5, help="steps per logged window")
    p.add_argument("--windows", type=int, default=4, help="timed windows per run (after one dropped)")
    p.add_argument("--run-timeout", type=int, default=1200)
    p.add_argument("--out", default="benchmarks/results/multihost")
    args = p.parse_args(argv)
    if args.processes < 2:
        raise SystemExit("--processes must be at least 2 (the other side is 1 process)")
    n = args.processes * args.devices
    bench._ensure_host_devices(n)  # this process: the HLO analysis on n devices
    shapes = meshes([m for m in args.meshes.split(",") if m], args.processes, args.devices)
    size = "small" if args.small else "default"
    overrides = [*SIZES[size], *args.override]
    multi = f"{args.processes}x{args.devices}"
    sides = [f"1x{n}", multi]
    from jtl import config
    cfg = config.load("tiny-mlm", overrides)  # the overrides are checked before anything runs
    tokens = cfg.train.batch_size * cfg.data.seq_len

    coll = collective_table(overrides, shapes, args.processes, args.devices)
    with tempfile.TemporaryDirectory(prefix="jtl-multihost-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp / "xla-cache"))  # rounds after the first reuse programs
        env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        # One tokenizer for every run (trained once here, on one device), so runs differ only by layout.
        prep = tmp / "prep"
        subprocess.run([sys.executable, "-m", "jtl.cli", "-q", "train", "tiny-mlm", *overrides, "train.steps=1",
                        "train.progress=false", "mesh.data=1", f"run_dir={prep}"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=args.run_timeout)
        with_tok = [*overrides, f"data.tokenizer={prep / 'tokenizer'}"]
        rounds = []
        with bench.Quiet("multihost") as quiet:
            for r in range(args.rounds):
                got = {}
                order = [(m, s) for m in shapes for s in sides]
                order = order[r % len(order):] + order[:r % len(order)]
                for m, s in order:
                    tps = run_side(s == sides[0], args, [*with_tok, *mesh_keys(shapes[m])], tokens,
                                   tmp / f"r{r}-{m}-{s}", env)
                    got.setdefault(m, {})[s] = tps
                    print(f"[multihost] round {r} {m} {s}: {tps:.0f} tokens/s", file=sys.stderr, flush=True)
                rounds.append(got)
    results = []
    for m in shapes:
        ratios = [rd[m][multi] / rd[m][sides[0]] for rd in rounds]
        results.append({"mesh": m, "shape": shapes[m],
                        **{f"tokens_per_s_{s}": statistics.median(rd[m][s] for rd in rounds) for s in sides},
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios)})
    q = quiet.report()
    rows = [[r["mesh"], "x".join(map(str, r["shape"])), f"{r[f'tokens_per_s_{sides[0]}']:.0f}",
             f"{r[f'tokens_per_s_{multi}']:.0f}",
             f"**{r['ratio_median']:.3f}x** [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]"] for r in results]
    speed = bench.md_table(["mesh", "data x fsdp x tensor", f"{sides[0]} tokens/s", f"{multi} tokens/s",
                            f"{multi} / {sides[0]}"], rows)
    crows = [[m, op, c["count"], bench.fmt_bytes(c["operand_bytes"]),
              bench.fmt_bytes(c["cross_process_operand_bytes"]),
              bench.fmt_bytes(c["unclassified_operand_bytes"]) if c["unclassified_operand_bytes"] else "0"]
             for m, ops in coll.items() for op, c in ops.items()]
    wire = bench.md_table(["mesh", "op", "count", "operand bytes / device / step",
                           f"of which cross processes ({multi})", "unclassified"], crows)
    doc = {"kind": "multihost_scaling", "command": " ".join(sys.argv), "size": size, "overrides": overrides,
           "processes": args.processes, "devices_per_process": args.devices, "window": args.window,
           "windows": args.windows, "rounds": rounds, "results": results, "collectives": coll, "quiet": q,
           "machine": bench.machine(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    body = (f"## tokens/s (`jtl train`, token slots B x seq_len per second)\n\n{speed}\n\n"
            f"{args.rounds} rounds, each side's run timed over {args.windows} windows of {args.window} steps after "
            f"one dropped window. Machine: {quiet.describe()}.\n\n"
            f"## Collectives per train step (compiled HLO; deterministic)\n\n{wire}\n\n"
            f"Ops inside a scanned layer loop would count once (these models do not scan). Overrides: "
            f"`{' '.join(overrides)}`.")
    bench.write_doc(Path(args.out), "scaling", doc, f"Multi-process cost: {multi} against {sides[0]} devices", body)
    print(speed + "\n\n" + wire)
    return 0


if __name__ == "__main__":
    sys.exit(main())
