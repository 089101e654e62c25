"""Where a train step's time goes: jtl's compiled step (jax.profiler) next to the
Hugging Face PyTorch step (torch.profiler), same model, batch and optimizer.

    .venv/bin/python benchmarks/profile_step.py --preset minilm-l6 --batch 32 --seq 128 \
        --steps 4 --out benchmarks/results/profile/minilm-l6

jtl side: ``jtl.train.build(...).train_step`` compiled once, ``--steps`` steps under
``jax.profiler.trace``. Every XLA:CPU thunk the trace records (one per fusion,
dot, copy, ... of the compiled HLO) is matched to its instruction in
``compiled.as_text()`` and put in a category from its opcodes and the
``op_name`` metadata that jtl's named scopes leave there (``attention``,
``dropout``, ``optimizer``, ``prepare_batch``); container thunks (``while``,
``call``, ``conditional``) are skipped so nothing is counted twice.

PyTorch side: ``benchmarks/peer_pytorch.py``'s loop (forward, backward,
``clip_grad_norm_``, AdamW) under ``torch.profiler``; each op's *self* CPU time
goes to a category by its name and by whether it ran inside
``Optimizer.step`` / ``clip_grad_norm_``.

Caveat, measured here: XLA:CPU runs dot thunks asynchronously on its Eigen
thread pool, so a dot's trace event covers its dispatch, not its work: the
matmul row is far below the real matmul time, and the step's wall time exceeds
the sum of the events. The other rows are synchronous kernels and do measure
their work; compare matmul speed through the host matmul peaks that
``peer_pytorch.py`` measures (XLA vs torch) instead.

Both columns are op time per step (the sum over the ops, which may exceed the
step's wall time where two ops ran at once on different cores) and each
category's share. The machine's quietness is recorded (``jtl.bench.Quiet``);
the trace itself goes to ``--trace-dir`` (open it in TensorBoard / Perfetto).
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from jtl import bench  # noqa: E402
from peer_pytorch import TorchSide, jtl_side  # noqa: E402

CATEGORIES = ("matmuls (dense layers, MLM head)", "attention (QK, mask, softmax, PV)", "layer norms",
              "loss (softmax cross-entropy)", "embedding gather / scatter", "RNG (dropout bits, masking)",
              "dropout apply", "optimizer (clip + AdamW)", "copies / transposes / layout", "collectives",
              "elementwise / other (GELU, residuals, ...)")
DOT, ATT, NORM, LOSS, EMB, RNG, DROP, OPT, COPY, COLL, OTHER = CATEGORIES
_COLLECTIVES = set(bench.COLLECTIVES) | {"all-reduce-start", "all-gather-start", "collective-permute-start"}
_LAYOUT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate", "dynamic-slice",
           "dynamic-update-slice", "parameter", "tuple", "get-tuple-element", "pad", "reverse", "iota",
           "constant", "copy-start", "copy-done", "bitcast-convert"}
_CONTAINERS = {"while", "call", "conditional"}

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> dict:
    """{instruction name: (opcode, op_name, [called computations])} and
    {computation: [instruction names]} from compiled HLO text."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and " = " not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, opcode = m.groups()
            op_name = _OPNAME.search(line)
            instrs[name] = (opcode, op_name.group(1) if op_name else "", _CALLS.findall(line))
            comps[current].append(name)
    return {"instrs": instrs, "comps": comps}


def categorize(name: str, hlo: dict) -> str | None:
    """Category of one executed thunk; None for containers (their bodies are counted)."""
    instrs, comps = hlo["instrs"], hlo["comps"]
    if name not in instrs:  # a thunk XLA named itself (e.g. a YNN-fused dot)
        return DOT if "dot" in name or "ynn" in name else OTHER
    opcode, op_name, called = instrs[name]
    if opcode in _CONTAINERS:
        return None
    if opcode in _COLLECTIVES:
        return COLL
    inner = [instrs[i] for c in called for i in comps.get(c, ())]  # a fusion's body
    opcodes = {opcode} | {o for o, _, _ in inner}
    names = [op_name] + [n for _, n, _ in inner]
    text = " ".join(names)
    if "optimizer" in text:
        return OPT
    if "rng-bit-generator" in opcodes or any(k in text for k in ("threefry", "random_bits", "_uniform",
                                                                   "_bernoulli", "random_")):
        return RNG
    if "attention" in text:
        return ATT
    if "(loss)" in text or "/loss/" in text:
        return LOSS
    if opcodes & {"dot", "convolution"} or (opcode == "custom-call" and "dot" in name) or "ynn" in name:
        return DOT
    if "(norm)" in text or "/norm/" in text:
        return NORM
    if opcodes & {"gather", "scatter"}:
        return EMB
    if "dropout" in text:
        return DROP
    if opcodes <= _LAYOUT:
        return COPY
    return OTHER


def _wall(step, n: int) -> float:
    """Median seconds per step without the profiler."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _trace_events(trace_dir: Path, module_prefix: str):
    """(hlo_op, duration ns) of every XLA thunk event of ``module_prefix`` in the newest trace."""
    files = sorted(glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True), key=lambda f: Path(f).stat().st_mtime)
    data = jax.profiler.ProfileData.from_file(files[-1])
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" in stats and str(stats.get("hlo_module", "")).startswith(module_prefix):
                    yield stats["hlo_op"], ev.duration_ns


def dot_probe(trace_dir: Path, n: int = 2048) -> dict:
    """One n x n matmul: its thunk event against its wall time (shows that XLA:CPU's dot
    thunks are asynchronous, so their events cover the dispatch, not the work)."""
    import jax.numpy as jnp
    f = jax.jit(lambda a, b: jnp.tanh(a @ b))
    a = jnp.ones((n, n))
    f(a, a).block_until_ready()
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    wall = time.perf_counter() - t0
    with jax.profiler.trace(str(trace_dir)):
        f(a, a).block_until_ready()
    dots = [d for op, d in _trace_events(trace_dir, "jit_") if op.startswith("dot")]
    return {"n": n, "wall_ms": 1e3 * wall, "dot_event_ms": sum(dots) / 1e6}


def jtl_profile(cfg, steps: int, trace_dir: Path) -> dict:
    step, compiled, compile_s = jtl_side(cfg)
    for _ in range(2):
        step()
    hlo = parse_hlo(compiled.as_text())
    plain = _wall(step, steps)
    trace_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    per_op, per_cat, count, thunks = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for op, ns in _trace_events(trace_dir, "jit_train_step"):
        cat = categorize(op, hlo)
        if cat is None:
            continue
        thunks += 1
        count[cat] += 1 / steps
        per_op[(op, cat)] += ns / 1e6 / steps
        per_cat[cat] += ns / 1e6 / steps
    if not thunks:
        raise SystemExit(f"no XLA thunk events for jit_train_step in {trace_dir}: did the profiler record?")
    return {"step_wall_ms": 1e3 * wall, "step_wall_ms_unprofiled": 1e3 * plain, "compile_s": compile_s,
            "categories_ms": dict(per_cat), "thunks_per_step": dict(count), "thunks_total_per_step": thunks / steps,
            "top_ops": [{"op": o, "category": c, "ms": ms} for (o, c), ms in per_op.most_common(15)],
            "trace": str(trace_dir)}


def torch_category(ev) -> str:
    name, parent = ev.name, ev.cpu_parent
    while parent is not None:
        if "Optimizer.step" in parent.name or "clip_grad" in parent.name:
            return OPT
        parent = parent.cpu_parent
    if "_foreach" in name or "Optimizer" in name:
        return OPT
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return LOSS
    if "scaled_dot_product" in name or "softmax" in name:
        return ATT
    if "layer_norm" in name:
        return NORM
    if "embedding" in name or "index_select" in name:
        return EMB
    if any(k in name for k in ("bernoulli", "rand", "topk", "native_dropout")):
        return RNG if "backward" not in name else DROP
    if any(k in name for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
        return DOT
    if any(k in name for k in ("copy_", "clone", "contiguous", "aten::t", "transpose", "permute", "cat",
                               "expand", "view", "reshape", "gather", "scatter", "index")):
        return COPY
    return OTHER


def torch_profile(cfg, host, steps: int) -> dict:
    import torch
    side = TorchSide(cfg, host, full_head=False)
    for _ in range(2):
        side.step()
    plain = _wall(side.step, steps)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            side.step()
    wall = (time.perf_counter() - t0) / steps
    per_op, per_cat = collections.Counter(), collections.Counter()
    for ev in prof.events():
        ms = ev.self_cpu_time_total / 1e3 / steps
        if ms <= 0:
            continue
        cat = torch_category(ev)
        per_op[(ev.name, cat)] += ms
        per_cat[cat] += ms
    return {"step_wall_ms": 1e3 * wall, "step_wall_ms_unprofiled": 1e3 * plain, "categories_ms": dict(per_cat),
            "top_ops": [{"op": o, "category": c, "ms": ms} for (o, c), ms in per_op.most_common(15)]}


def report(doc: dict) -> str:
    j, t = doc["jtl"], doc.get("torch")
    jt, tt = sum(j["categories_ms"].values()), sum(t["categories_ms"].values()) if t else 0

    def cells(side, total, cat):
        if side is None:
            return ["-", "-"]
        ms = side["categories_ms"].get(cat, 0.0)
        return [f"{ms:.1f}", f"{100 * ms / total:.0f}%"]

    rows = [[c, *cells(j, jt, c), f"{j['thunks_per_step'].get(c, 0):.0f}", *cells(t, tt, c)] for c in CATEGORIES]
    rows.append(["**sum of op time**", f"{jt:.1f}", "100%", f"{j['thunks_total_per_step']:.0f}",
                 f"{tt:.1f}" if t else "-", "100%" if t else "-"])
    for key, label in (("step_wall_ms", "**step wall time, profiler on**"),
                       ("step_wall_ms_unprofiled", "**step wall time, profiler off** (median)")):
        rows.append([label, f"{j[key]:.1f}", "", "", f"{t[key]:.1f}" if t else "-", ""])
    table = bench.md_table(["category", "jtl ms/step", "jtl share", "jtl thunks/step", "PyTorch ms/step",
                            "PyTorch share"], rows)
    tops = []
    for label, side in (("jtl (XLA thunks)", j), ("PyTorch (aten ops, self time)", t)):
        if side:
            tops.append(f"### Top ops: {label}\n\n" + bench.md_table(
                ["op", "category", "ms/step"], [[o["op"], o["category"], f"{o['ms']:.2f}"] for o in side["top_ops"]]))
    caveat = ("jtl's matmul row counts only the dispatch of XLA:CPU's asynchronous dot thunks (their work runs "
              "on the Eigen pool outside any event), so jtl's sum of op time is below its wall time; the other "
              "rows are synchronous kernels. PyTorch's column is aten self time.")
    q = doc["quiet"]
    return (f"{table}\n\n{caveat}\n\n" + "\n\n".join(tops)
            + f"\n\nMachine: other processes used {100 * (q['others_cpu_share'] or 0):.1f}% of the cores "
              f"while profiling; load {q['load_1min_at_start']} at start, {q['load_1min_after']} after; "
              f"{'quiet' if q['quiet'] else 'NOT QUIET: not a figure'}.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="minilm-l6")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--override", action="append", default=[], help="jtl config key=value (repeatable)")
    p.add_argument("--no-torch", action="store_true", help="profile jtl only")
    p.add_argument("--out", default="runs/bench/profile")
    p.add_argument("--trace-dir", default=None, help="default: OUT/trace (not for git: tens of MB)")
    p.add_argument("--dot-probe", action="store_true", help="only time one 2048x2048 matmul's event vs its wall")
    args = p.parse_args(argv)
    if args.dot_probe:
        r = dot_probe(Path(args.trace_dir or "runs/bench/dot-probe"))
        print(f"{r['n']}x{r['n']} matmul: wall {r['wall_ms']:.1f} ms, its dot thunk event {r['dot_event_ms']:.1f} ms")
        return 0
    import torch
    torch.set_num_threads(args.threads)
    cfg = bench.bench_config(args.preset, args.batch, args.seq, "float32", args.override)
    out = Path(args.out)
    with bench.Quiet("profile") as quiet:
        doc = {"jtl": jtl_profile(cfg, args.steps, Path(args.trace_dir or out / "trace"))}
        if not args.no_torch:
            doc["torch"] = torch_profile(cfg, bench.synthetic_batch(cfg), args.steps)
    doc.update(kind="profile_step", preset=args.preset, batch=args.batch, seq=args.seq, task=cfg.task.kind,
               overrides=args.override, command=" ".join(sys.argv), quiet=quiet.report(),
               time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               machine={**bench.machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    text = bench.write_doc(out, "profile", doc, f"Train-step profile: {args.preset} B={args.batch} "
                           f"S={args.seq} {cfg.task.kind}", report(doc))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
