"""Tables, plots and report files for ``jtl bench`` (JSON + Markdown + PNG)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


LOAD_AT_IMPORT = os.getloadavg()[0]  # before this process compiled anything


class Quiet:
    """How quiet the machine was around a timing run: the share of all cores that
    *other* processes used meanwhile (from /proc/stat minus this process's own CPU
    time), and the 1-minute load average when this process started, before and
    after (the load average counts this process's own compiling too, so the
    others' share decides). A speed ratio taken while something else ran is not a
    figure: ``__exit__`` says so loudly and ``report()["quiet"]`` is false.

        with bench.Quiet("peer") as q:
            ...timed work...
        doc["quiet"] = q.report()
    """
    OTHERS_LIMIT, LOAD_LIMIT = 0.1, 0.5  # cores other processes may use; load when no /proc/stat

    def __init__(self, label: str = "bench", helpers_cpu_s=None):
        """``helpers_cpu_s``: a callable giving the CPU seconds that live helper processes of
        this run (e.g. a benchmark's worker) have used so far; their work is not others'."""
        self.label, self.result, self.helpers_cpu_s = label, None, helpers_cpu_s

    @staticmethod
    def _busy_s():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = v
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _own_s(self):
        t = os.times()
        helpers = self.helpers_cpu_s() if self.helpers_cpu_s else 0.0
        return t.user + t.system + t.children_user + t.children_system + helpers

    def __enter__(self):
        self.load_before = os.getloadavg()[0]
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy_s(), self._own_s()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        busy1 = self._busy_s()
        others = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            others = max(0.0, (busy1 - self.busy0) - (self._own_s() - self.own0)) / (wall * os.cpu_count())
        quiet = (others * os.cpu_count() <= self.OTHERS_LIMIT if others is not None
                 else self.load_before <= self.LOAD_LIMIT)
        self.result = {"load_1min_at_start": round(LOAD_AT_IMPORT, 2),
                       "load_1min_before": round(self.load_before, 2),
                       "load_1min_after": round(os.getloadavg()[0], 2),
                       "others_cpu_share": None if others is None else round(others, 3),
                       "wall_s": round(wall, 1), "quiet": quiet}
        if not quiet:
            print(f"[{self.label}] WARNING: NOT QUIET ({self.describe()}): other work shared the cores; "
                  f"re-run alone before quoting these numbers", file=sys.stderr, flush=True)
        return False

    def report(self) -> dict:
        return self.result

    def describe(self) -> str:
        r = self.result
        share = "?" if r["others_cpu_share"] is None else f"{100 * r['others_cpu_share']:.1f}%"
        return (f"other processes used {share} of the cores; load {r['load_1min_at_start']:.2f} at start, "
                f"{r['load_1min_before']:.2f} before, {r['load_1min_after']:.2f} after; "
                f"{'quiet' if r['quiet'] else 'NOT QUIET'}")


def machine() -> dict:
    import jax
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()[:4]],
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "CPU(s)", "Thread(s) per core",
                               "L2 cache", "L3 cache"):
                info["lscpu " + key.strip()] = val.strip()
            elif key.strip() == "Flags":  # the SIMD level decides XLA's and torch's matmul speed
                flags = val.split()
                info["lscpu SIMD"] = " ".join(f for f in flags if f in _SIMD_FLAGS) or "none listed"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def throughput_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        rows.append([r["preset"], r["dtype"], r["batch"], r["seq"], f"{r['tokens_per_s']:.0f}",
                     f"{r['examples_per_s']:.2f}",
                     f"{r['step_s_median']:.3f} [{r['step_s_min']:.3f}-{r['step_s_max']:.3f}]",
                     f"{r['compile_s']:.1f}", mfu, fmt_bytes(r["memory"].get("peak_estimate")),
                     fmt_bytes(r.get("allocator_peak_bytes"))])
    return md_table(["preset", "dtype", "batch", "seq", "tokens/s", "examples/s",
                     "step s median [min-max]", "compile s", "MFU", "XLA peak mem", "allocator peak"], rows)


def scaling_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        m = r["mesh"]
        c = r["collectives"]
        coll = ", ".join(f"{op} {v['count']}x/{fmt_bytes(v['operand_bytes'])}"
                         for op, v in c.items() if v["count"]) or "none"
        rows.append([r.get("strategy", "-"), r["devices"], f"{m['data']}x{m['fsdp']}x{m['tensor']}",
                     fmt_bytes(r["param_bytes_per_device"]), fmt_bytes(r["opt_bytes_per_device"]),
                     fmt_bytes(r["memory"].get("temp")), fmt_bytes(r["memory"].get("peak_estimate")),
                     f"{(r['hlo_flops_per_device'] or 0) / 1e9:.2f}"
                     + (" (scan body once)" if r.get("scan_layers") else ""),
                     f"{r['model_flops_per_device'] / 1e9:.2f}", coll])
    return md_table(["strategy", "devices", "data x fsdp x tensor", "params/device", "optimizer/device",
                     "temp/device", "XLA peak/device", "HLO GFLOPs/device",
                     "model GFLOPs/device", "collectives (count/operand bytes)"],
                    rows)


def plot_throughput(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['preset']}\n{r['dtype']} b{r['batch']} s{r['seq']}" for r in results]
    x = np.arange(len(results))
    axes[0].bar(x, [r["tokens_per_s"] for r in results], color="tab:blue")
    axes[0].set_ylabel("tokens / s")
    axes[1].bar(x, [100 * (r["mfu"] or 0) for r in results], color="tab:orange")
    axes[1].set_ylabel("MFU %")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    fig.suptitle("jtl train step throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for strat in sorted({r["strategy"] for r in results}):
        rs = sorted((r for r in results if r["strategy"] == strat), key=lambda r: r["devices"])
        n = [r["devices"] for r in rs]
        axes[0].plot(n, [r["state_bytes_per_device"] / 2 ** 20 for r in rs], "o-", label=strat)
        axes[1].plot(n, [r["memory"].get("temp", 0) / 2 ** 20 for r in rs], "o-", label=strat)
        axes[2].plot(n, [r["collective_bytes"] / 2 ** 20 for r in rs], "o-", label=strat)
    for ax, title in zip(axes, ("params + optimizer MiB / device", "temp (activations) MiB / device",
                                "collective operand MiB / device / step")):
        ax.set_title(title)
        ax.set_xlabel("devices")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, kind: str, results: list[dict], extra: dict | None = None,
                 notes: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "machine": machine(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join(sys.argv), "results": results, **(extra or {})}
    (out / f"{kind}.json").write_text(json.dumps(doc, indent=1, default=str))
    table = throughput_table(results) if kind == "throughput" else scaling_table(results)
    mach = "\n".join(f"- {k}: {v}" for k, v in doc["machine"].items())
    (out / f"{kind}.md").write_text(f"# jtl bench {kind}\n\n`{doc['command']}` at {doc['time_utc']}\n\n"
                                    f"{table}\n\n{notes}\n\nMachine:\n{mach}\n")
    if results:
        (plot_throughput if kind == "throughput" else plot_scaling)(results, out / f"{kind}.png")
    print(table)


def add_quiet(out: Path, kind: str, quiet: dict) -> None:
    """Record how quiet the machine was (``Quiet.report()``) in a written report."""
    js, md = out / f"{kind}.json", out / f"{kind}.md"
    if js.exists():
        doc = json.loads(js.read_text())
        doc["quiet"] = quiet
        js.write_text(json.dumps(doc, indent=1, default=str))
    if md.exists():
        share = quiet["others_cpu_share"]
        md.write_text(md.read_text() + f"\nMachine: other processes used "
                      f"{'?' if share is None else f'{100 * share:.1f}%'} of the cores while timing; "
                      f"1-minute load {quiet['load_1min_at_start']} at start, {quiet['load_1min_after']} "
                      f"after; {'quiet' if quiet['quiet'] else 'NOT QUIET: not a figure'}.\n")


def write_doc(out: Path, name: str, doc: dict, title: str, body: str) -> str:
    """``out/name.json`` (``doc``, which names its ``command`` and ``time_utc``) and
    ``out/name.md``: the title, the command and time, ``body``, then ``doc["machine"]``.
    Returns the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    mach = "\n".join(f"- {k}: {v}" for k, v in doc.get("machine", {}).items())
    text = f"# {title}\n\n`{doc['command']}` at {doc['time_utc']}\n\n{body}\n" + (
        f"\nMachine:\n{mach}\n" if mach else "")
    (out / f"{name}.md").write_text(text)
    return text
