"""``jtl bench``: speed and memory of the real train step (``jtl.train.build``).

Every number comes from ``build(...).train_step`` itself (or, for meshes this
machine cannot hold, the same jitted step compiled ahead of time from
``jtl.train.abstract_state``), fed synthetic batches: random token ids, full
rows, one segment per row.

  jtl bench throughput [--presets minilm-l6,bert-base] [--batch 16,32] [--seq 128]
                       [--dtype float32,bfloat16] [--full] [--out DIR]
  jtl bench scaling    [--preset minilm-l6] [--devices 1,2,4,8] [--out DIR]
  jtl bench aot        --preset llama-7b --mesh 8,4,2 [--batch 64] [--seq 4096]

Each writes ``results.json``, ``results.md`` and PNG plots to ``--out``. The
PyTorch side-by-side comparison lives in ``benchmarks/peer_pytorch.py``.

Reading the numbers
-------------------
* step time: median (and min/max) over timed steps after ``--warmup`` steps;
  tokens/s = batch x seq / median.
* MFU: model FLOPs from ``jtl.metrics.train_flops_per_step`` over the peak.
  On CPU the peak is a float32 matmul measured in the same run on this host
  (simulated devices share it); on GPU/TPU it is the datasheet bf16 peak x devices.
* memory: XLA's compiled ``memory_analysis()`` per device (arguments + outputs
  - aliased (donated) + temporaries); on GPU also the allocator's peak.
* collectives: count and bytes of every all-gather / reduce-scatter /
  all-reduce / collective-permute / all-to-all in the compiled HLO, operand
  shapes parsed from the text. An op inside a scanned (while) body is counted
  once, not once per iteration.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from jtl.bench_report import (Quiet, add_quiet, fmt_bytes, machine, md_table, write_doc,  # noqa: F401 (re-exported)
                              write_report)

DEFAULT_PRESETS = ("minilm-l6", "bert-base")
FULL_PRESETS = ("minilm-l6", "bert-base", "bert-large", "gpt2-small", "llama-1b")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


# ---------------------------------------------------------------- configs and batches


def bench_config(preset: str, batch: int, seq: int, dtype: str = "float32", overrides=()):
    """A preset with the benchmark's batch, row length and compute dtype."""
    from jtl import config
    ov = [f"train.batch_size={batch}", f"data.seq_len={seq}", f"model.dtype={dtype}",
          "train.microbatches=1"]
    return config.load(preset, ov + list(overrides))


def task_spec(cfg):
    from jtl.tasks import TaskSpec, mlm_max_predictions
    if cfg.task.kind == "mlm":
        return TaskSpec(mask_id=min(4, cfg.model.vocab_size - 1),
                        max_predictions=mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob))
    return TaskSpec()


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """Host numpy rows for ``cfg.task.kind`` (mlm or clm): random ids, full rows."""
    b, s, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(5, v - 1), v, (b, s + 1)).astype(np.int32)
    out = {"input_ids": ids[:, :s], "segment_ids": np.ones((b, s), np.int32),
           "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}
    if cfg.task.kind == "mlm":
        out["mlm_eligible"] = np.ones((b, s), bool)
    elif cfg.task.kind == "clm":
        out["targets"] = ids[:, 1:].copy()
        out["loss_weights"] = np.ones((b, s), np.float32)
    else:
        raise ValueError(f"jtl bench measures mlm/clm presets, got task.kind={cfg.task.kind!r}")
    return out


def abstract_batch(cfg, mesh) -> dict:
    import jax
    from jtl import sharding as S
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=S.batch_sharding(mesh, v.ndim))
            for k, v in synthetic_batch(cfg).items()}


# ---------------------------------------------------------------- peaks, memory, HLO


def measure_host_peak(n: int = 1536, repeats: int = 6) -> float:
    """float32 matmul FLOP/s of this host through XLA, measured now (not cached)."""
    from jtl.metrics import measure_matmul_peak
    return measure_matmul_peak(n, repeats)


def mesh_peak(mesh, host_peak: float | None) -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh and where the number came from."""
    from jtl.metrics import DATASHEET_PEAK
    d = mesh.devices.flat[0]
    if d.platform == "cpu":
        # Simulated CPU devices share the host's cores: the mesh's peak is the host's.
        return host_peak, "float32 matmul measured on this host in this run"
    kind = getattr(d, "device_kind", "").lower()
    for name, peak in DATASHEET_PEAK.items():
        if name in kind:
            return peak * mesh.size, f"datasheet bf16 dense peak of {kind} x {mesh.size}"
    return float("nan"), f"unknown peak for {kind}"


def memory(compiled) -> dict:
    """Per-device bytes from XLA's compiled memory analysis."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def allocator_peak() -> int | None:
    """Allocator peak bytes of device 0 (GPU/TPU); None on CPU."""
    import jax
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def hlo_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_OP_RE = re.compile(r"=\s*(?P<result>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES) +
                    r")(?:-start)?\((?P<args>.*?)\)(?:,|\s*$)")


def shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE_RE.findall(text):
        n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
        total += int(n * _DTYPE_BYTES.get(dt, 1))  # f8 types: 1 byte
    return total


_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+[\w\-]+\(")


def collectives(hlo_text: str, process_of=None) -> dict:
    """{op: {count, operand_bytes, result_bytes}} for the collectives in compiled HLO text.

    Async pairs are counted once (the ``-start``); a ``-done`` is not a new op.
    Bytes are per device (this device's operands and results). Compiled HLO
    names operands without their shapes, so each operand's shape is looked up
    from the line that defines it.

    ``process_of[i]``: the process holding logical device i (position i of the
    program's device assignment, i.e. ``mesh.devices.flat``). With it, each op also
    gets ``cross_process_operand_bytes`` (ops whose device groups span processes:
    the bytes that cross the network between hosts) and ``unclassified_operand_bytes``
    (a replica-group form this parser does not know)."""
    lines = hlo_text.splitlines()
    types = {}
    for line in lines:
        d = _DEF_RE.match(line)
        if d:
            types[d["name"]] = d["type"]
    out = {op: {"count": 0, "operand_bytes": 0, "result_bytes": 0} for op in COLLECTIVES}
    if process_of is not None:
        for rec in out.values():
            rec.update(cross_process_operand_bytes=0, unclassified_operand_bytes=0)
    for line in lines:
        m = _OP_RE.search(line)
        if not m:
            continue
        rec = out[m["op"]]
        rec["count"] += 1
        inline = shape_bytes(m["args"])
        operand = inline or sum(shape_bytes(types.get(n, "")) for n in re.findall(r"%([\w.\-]+)", m["args"]))
        rec["operand_bytes"] += operand
        rec["result_bytes"] += shape_bytes(m["result"])
        if process_of is not None:
            groups = device_groups(line, len(process_of))
            if groups is None:
                rec["unclassified_operand_bytes"] += operand
            elif any(len({process_of[i] for i in g}) > 1 for g in groups):
                rec["cross_process_operand_bytes"] += operand
    return out


_IOTA_RE = re.compile(r"\[([\d,]+)\](?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?")
_MESH_RE = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
                      r"(?:,\s*device_ids=\((?P<ids>\[[\d,]*\](?:T\([\d,]*\))?|[\d,\s]*)\))?\s*\{(?P<group>[^}]*)\}")


def _iota(dims: str, reshape: str | None, perm: str | None) -> np.ndarray:
    """XLA's iota tile assignment ``[dims]<=[reshape]T(perm)``: arange, reshaped, transposed."""
    shape = [int(x) for x in (reshape or dims).split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if perm:
        ids = ids.transpose([int(x) for x in perm.split(",")])
    return ids.reshape([int(x) for x in dims.split(",")])


def device_groups(line: str, n_devices: int) -> list[list[int]] | None:
    """The groups of logical device ids that one collective's HLO line exchanges data
    within, from any of the forms XLA prints: no ``replica_groups`` / ``{}`` (all devices),
    ``{{0,1},{2,3}}``, iota ``[2,4]<=[4,2]T(1,0)``, mesh axes ``mesh['a'=2,'b'=4],
    device_ids=([2,4]T(1,0)) {'b'}`` (sub-axes ``'b':(1)2``), and collective-permute's
    ``source_target_pairs``. None for a form not recognised."""
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs[1])]
    mesh = _MESH_RE.search(line)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh["axes"])
        sizes = [int(s) for _, s in axes]
        if mesh["ids"] and "[" in mesh["ids"]:
            iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", mesh["ids"])
            ids = _iota(",".join(map(str, sizes)), iota[1], iota[2])
        elif mesh["ids"]:
            ids = np.array([int(x) for x in mesh["ids"].replace(" ", "").split(",")]).reshape(sizes)
        else:
            ids = np.arange(math.prod(sizes)).reshape(sizes)
        # A device's group is fixed by its mesh coordinates with the grouped (sub-)axes' digits
        # removed: for 'b', all of b; for 'b':(pre)size, the digit (c // pre) % size of b.
        names = [n for n, _ in axes]
        grouped = {}
        for name, pre, size in re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", mesh["group"]):
            if name not in names:
                return None
            d = names.index(name)
            grouped.setdefault(d, []).append((int(pre), int(size)) if pre else (1, sizes[d]))
        groups: dict = {}
        for coord in np.ndindex(*sizes):
            key = tuple(c - sum((c // pre) % size * pre for pre, size in grouped.get(d, ()))
                        for d, c in enumerate(coord))
            groups.setdefault(key, []).append(int(ids[coord]))
        return list(groups.values())
    rg = re.search(r"replica_groups=(\{[\d,{}]*\}|\[[\d,]+\](?:<=\[[\d,]+\](?:T\([\d,]+\))?)?)", line)
    if rg is None:
        return None if "replica_groups=" in line else [list(range(n_devices))]
    text = rg[1]
    if text.startswith("{"):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
        return groups or [list(range(n_devices))]
    iota = _IOTA_RE.fullmatch(text)
    return [list(map(int, g)) for g in _iota(*iota.groups())] if iota else None


# ---------------------------------------------------------------- measurements


def measure(cfg, mesh=None, *, warmup: int = 2, steps: int = 5, host_peak: float | None = None,
            seed: int = 0) -> dict:
    """Compile and time ``build(cfg, ...).train_step`` on a synthetic batch."""
    import jax
    from jtl import sharding as S
    from jtl.metrics import train_flops_per_step
    from jtl.train import build
    mesh = mesh if mesh is not None else S.make_mesh(cfg.mesh)
    spec = task_spec(cfg)
    setup = build(cfg, spec, mesh, total_steps=10_000)
    batch = S.global_batch(mesh, synthetic_batch(cfg, seed))
    t0 = time.perf_counter()
    lowered = setup.train_step.lower(setup.state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.params))
    state, setup.state = setup.state, None  # donated to the step from here on
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, *setup.train_step.bound_args())
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    loss = float(metrics["loss"])
    del state
    timed = times[warmup:]
    med = statistics.median(timed)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    flops = train_flops_per_step(cfg.model, b, s, cfg.task.kind, spec.max_predictions)
    peak, peak_src = mesh_peak(mesh, host_peak)
    return {
        "preset": cfg.name, "family": cfg.model.family, "task": cfg.task.kind,
        "dtype": cfg.model.dtype, "batch": b, "seq": s,
        "mesh": dict(zip(S.MESH_AXES, (mesh.shape[a] for a in S.MESH_AXES))),
        "params": n_params,
        "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
        "step_s_median": med, "step_s_min": min(timed), "step_s_max": max(timed),
        "step_s_all": times, "warmup": warmup,
        "tokens_per_s": b * s / med, "examples_per_s": b / med,
        "model_flops_per_step": flops, "hlo_flops_per_device": hlo_flops(compiled),
        "peak_flops": peak, "peak_source": peak_src,
        "mfu": flops / med / peak if peak and math.isfinite(peak) else None,
        "memory": memory(compiled), "allocator_peak_bytes": allocator_peak(),
        "final_loss": loss,
    }


def analyze(cfg, mesh, *, platform: str = "cpu", process_of=None) -> dict:
    """Compile the train step for ``mesh`` without allocating anything: per-device
    state bytes, XLA memory, FLOPs and collectives. ``mesh`` may be an
    ``AbstractMesh`` bigger than this machine (compiled for analysis only).
    ``process_of``: see ``collectives`` (which bytes would cross hosts)."""
    import jax
    from jtl import sharding as S
    from jtl.metrics import train_flops_per_step
    from jtl.train import abstract_state, jit_train_step
    S.check_model_fits(cfg.model, mesh)
    S.check_batch_fits(cfg.train.batch_size, cfg.train.microbatches, mesh)
    spec = task_spec(cfg)
    t0 = time.perf_counter()
    graphdef, abstract, shardings, _ = abstract_state(cfg, spec, mesh, 10_000)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    step = jit_train_step(cfg, spec, mesh, graphdef, shardings, 10_000)
    traced = step.trace(state, abstract_batch(cfg, mesh))
    if isinstance(mesh, jax.sharding.AbstractMesh):
        lowered = traced.lower(lowering_platforms=(platform,))
        # A device assignment of the mesh's size, repeating this host's devices:
        # valid for analysis (memory, FLOPs, collectives), never for running.
        reps = -(-mesh.size // len(jax.devices()))
        compiled = lowered.compile(device_assignment=(tuple(jax.devices()) * reps)[: mesh.size])
    else:
        lowered = traced.lower()
        compiled = lowered.compile()
    t1 = time.perf_counter()
    params_b = S.per_device_bytes(state[0])
    total_params_b = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state[0]))
    opt_b = S.per_device_bytes(state[1])
    total_opt_b = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state[1]))
    coll = collectives(compiled.as_text(), process_of)
    return {
        "preset": cfg.name, "dtype": cfg.model.dtype, "batch": cfg.train.batch_size,
        "seq": cfg.data.seq_len, "devices": mesh.size,
        "mesh": dict(zip(S.MESH_AXES, (mesh.shape[a] for a in S.MESH_AXES))),
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state[0])),
        "param_bytes_per_device": params_b, "opt_bytes_per_device": opt_b,
        "state_bytes_per_device": params_b + opt_b, "state_bytes_total": total_params_b + total_opt_b,
        "memory": memory(compiled), "hlo_flops_per_device": hlo_flops(compiled),
        "model_flops_per_device": train_flops_per_step(
            cfg.model, cfg.train.batch_size, cfg.data.seq_len, cfg.task.kind, spec.max_predictions) / mesh.size,
        "scan_layers": cfg.model.scan_layers,
        "global_flops": hlo_flops(lowered), "collectives": coll,
        "collective_bytes": sum(c["operand_bytes"] for c in coll.values()),
        "analysis_s": t1 - t0,
    }


def scaling_meshes(n: int) -> dict:
    """The meshes compared at ``n`` devices: data, fsdp, tensor, and a mix."""
    out = {"data": (n, 1, 1)}
    if n > 1:
        out["fsdp"] = (1, n, 1)
        out["tensor"] = (1, 1, n)
    if n >= 4:
        out["mixed"] = (n // 4, 2, 2)
    return out


# ---------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_throughput(args) -> list[dict]:
    from jtl import sharding as S
    presets = args.presets.split(",") if args.presets else list(FULL_PRESETS if args.full else DEFAULT_PRESETS)
    batches = _ints(args.batch) if args.batch else ([8, 16, 32] if args.full else [None])
    seqs = _ints(args.seq) if args.seq else ([128, 512] if args.full else [128])
    dtypes = args.dtype.split(",") if args.dtype else (["float32", "bfloat16"] if args.full else ["float32"])
    host_peak = measure_host_peak()
    results = []
    for preset in presets:
        for dtype in dtypes:
            for seq in seqs:
                for batch in batches:
                    from jtl import config
                    b = batch or config.load(preset).train.batch_size
                    cfg = bench_config(preset, b, seq, dtype, args.override)
                    mesh = S.make_mesh((1, 1, 1))
                    print(f"[bench] {preset} {dtype} batch={b} seq={seq}", file=sys.stderr, flush=True)
                    results.append(measure(cfg, mesh, warmup=args.warmup, steps=args.steps,
                                           host_peak=host_peak))
    write_report(Path(args.out), "throughput", results, {"host_peak_flops": host_peak},
                 notes=f"Host float32 matmul peak measured in this run: {host_peak / 1e9:.1f} GFLOP/s.")
    return results


def run_scaling(args) -> list[dict]:
    import jax
    from jtl import sharding as S
    from jtl.config import ConfigError
    cfg0 = bench_config(args.preset, args.batch, args.seq, args.dtype[0] if isinstance(args.dtype, list)
                        else (args.dtype or "float32"), args.override)
    results = []
    for n in _ints(args.devices):
        if n > jax.device_count():
            print(f"[bench] skip {n} devices: only {jax.device_count()} (set "
                  f"XLA_FLAGS=--xla_force_host_platform_device_count={n})", file=sys.stderr)
            continue
        for strat, shape in scaling_meshes(n).items():
            mesh = S.make_mesh(shape, jax.devices()[:n])
            print(f"[bench] scaling {strat} {shape}", file=sys.stderr, flush=True)
            try:
                r = analyze(cfg0, mesh)
            except (ConfigError, ValueError) as e:  # e.g. heads or vocab not divisible by tensor
                print(f"[bench] skip {strat} {shape}: {e}", file=sys.stderr)
                continue
            r["strategy"] = strat
            results.append(r)
    checks = fsdp_checks(results)
    write_report(Path(args.out), "scaling", results, {"checks": checks},
                 notes="FSDP check (params+optimizer per device <= total/N + 5%): " +
                 "; ".join(f"{c['devices']} devices {'ok' if c['ok'] else 'FAILED'} "
                           f"({fmt_bytes(c['per_device'])} vs {fmt_bytes(c['bound'])})" for c in checks))
    return results


def fsdp_checks(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        if r.get("strategy") == "fsdp":
            bound = r["state_bytes_total"] / r["devices"] * 1.05
            out.append({"devices": r["devices"], "per_device": r["state_bytes_per_device"],
                        "bound": bound, "ok": r["state_bytes_per_device"] <= bound})
    return out


def run_aot(args) -> list[dict]:
    import jax
    from jax.sharding import AbstractMesh, AxisType
    from jtl import sharding as S
    shape = tuple(_ints(args.mesh))
    if len(shape) != 3:
        raise SystemExit("--mesh takes data,fsdp,tensor, e.g. 8,4,2")
    ov = list(args.override)
    cfg = bench_config(args.preset, args.batch, args.seq, args.dtype or "float32", ov)
    mesh = AbstractMesh(shape, S.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    r = analyze(cfg, mesh)
    r["strategy"] = "aot " + "x".join(map(str, shape))
    notes = ("Compiled ahead of time for an AbstractMesh of "
             f"{math.prod(shape)} devices on {jax.device_count()} real {jax.devices()[0].platform} "
             "device(s), device assignment repeated to the mesh size: valid for memory, FLOPs and "
             "collective counts, never executed. Memory is XLA:CPU's estimate; GPU/TPU layouts, "
             "fusions and collective algorithms differ. Nothing was allocated (jtl.train.abstract_state).")
    write_report(Path(args.out), "scaling", [r], notes=notes)
    return [r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jtl bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("throughput", "scaling", "aot"):
        s = sub.add_parser(name)
        s.add_argument("--out", default=f"runs/bench/{name}")
        s.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
        if name == "throughput":
            s.add_argument("--presets", default=None)
            s.add_argument("--batch", default=None, help="comma list; default: the preset's batch")
            s.add_argument("--seq", default=None)
            s.add_argument("--dtype", default=None, help="float32,bfloat16")
            s.add_argument("--warmup", type=int, default=2)
            s.add_argument("--steps", type=int, default=5)
            s.add_argument("--full", action="store_true", help="all presets, batches 8-32, seq 128/512, fp32+bf16")
        else:
            s.add_argument("--preset", default="minilm-l6" if name == "scaling" else "llama-7b")
            s.add_argument("--batch", type=int, default=16 if name == "scaling" else 64)
            s.add_argument("--seq", type=int, default=128 if name == "scaling" else 4096)
            s.add_argument("--dtype", default="float32")
        if name == "scaling":
            s.add_argument("--devices", default="1,2,4,8")
        if name == "aot":
            s.add_argument("--mesh", default="8,4,2", help="data,fsdp,tensor")
    args = p.parse_args(argv)
    if args.what == "scaling":
        want = max(_ints(args.devices))
        _ensure_host_devices(want)
    with Quiet(f"bench {args.what}") as quiet:
        {"throughput": run_throughput, "scaling": run_scaling, "aot": run_aot}[args.what](args)
    if args.what != "aot":  # aot only compiles: nothing timed
        add_quiet(Path(args.out), args.what, quiet.report())
    return 0


def _ensure_host_devices(n: int) -> None:
    """Ask XLA for ``n`` simulated CPU devices if no backend has started yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
