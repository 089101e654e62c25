"""jtl vs Hugging Face Transformers on PyTorch: same shape, batch, row length,
optimizer (AdamW, fp32), same machine, alternating.

    .venv/bin/python benchmarks/peer_pytorch.py --presets minilm-l6:32,bert-base:16 \
        --rounds 5 --steps 3 --out benchmarks/results/cpu

Each round times ``--steps`` jtl steps (``jtl.train.build(...).train_step``)
then ``--steps`` PyTorch steps; the reported ratio is the median over rounds of
(jtl tokens/s) / (PyTorch tokens/s). PyTorch runs in its own worker process that
waits on a pipe while jtl runs (``--same-process`` runs it in jtl's process, as
before; there jtl's BERT-base throughput rose round by round, 252 to 319 tokens/s,
in benchmarks/results/cpu/peer-quiet-intel-gelu). The host's float32 matmul peak is measured
in the same run, through XLA and through torch, and the larger one is the
denominator of both sides' MFU.

The PyTorch step is a plain loop: ``model.train()``, forward, loss, backward,
``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (no decay on biases and
LayerNorm), ``torch.set_num_threads(2)``. For MLM both sides mask 15% of the
tokens inside the step and run the vocabulary projection only at the masked
positions (jtl always does; on the PyTorch side ``model.bert`` then
``model.cls`` on the gathered rows), so both compute the same FLOPs.
``--torch-full-head`` uses stock ``BertForMaskedLM(labels=...)`` instead,
which projects every position onto the vocabulary (about 2x the FLOPs for
MiniLM) -- what a user of the stock class gets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import torch  # noqa: E402

from jtl import bench  # noqa: E402
from jtl import sharding as S  # noqa: E402
from jtl.metrics import train_flops_per_step  # noqa: E402
from jtl.train import build  # noqa: E402


def torch_peak(n: int = 1536, repeats: int = 6) -> float:
    a = torch.randn(n, n)
    a @ a
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def torch_model(cfg):
    import transformers as tf
    m = cfg.model
    if m.family == "bert":
        hf = tf.BertConfig(vocab_size=m.vocab_size, hidden_size=m.hidden, num_hidden_layers=m.layers,
                           num_attention_heads=m.heads, intermediate_size=m.mlp,
                           max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab,
                           hidden_act="gelu", hidden_dropout_prob=m.dropout,
                           attention_probs_dropout_prob=m.attention_dropout, layer_norm_eps=m.norm_eps,
                           attn_implementation="sdpa")
        return tf.BertForMaskedLM(hf)
    if m.family == "gpt2":
        hf = tf.GPT2Config(vocab_size=m.vocab_size, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads,
                           n_inner=m.mlp, n_positions=m.max_len, resid_pdrop=m.dropout,
                           embd_pdrop=m.dropout, attn_pdrop=m.attention_dropout,
                           layer_norm_epsilon=m.norm_eps, activation_function="gelu_new",
                           attn_implementation="sdpa")
        return tf.GPT2LMHeadModel(hf)
    raise SystemExit(f"no PyTorch peer for model.family={m.family!r}")


class TorchSide:
    def __init__(self, cfg, batch: dict, full_head: bool):
        self.cfg, self.full_head = cfg, full_head
        self.model = torch_model(cfg).train()
        decay = [p for n, p in self.model.named_parameters() if not ("bias" in n or "LayerNorm" in n or "ln_" in n)]
        rest = [p for n, p in self.model.named_parameters() if ("bias" in n or "LayerNorm" in n or "ln_" in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                     eps=cfg.optim.eps)
        self.ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64)) if "targets" in batch else None
        self.p = max(1, math.ceil(cfg.data.seq_len * cfg.data.mask_prob))

    def step(self):
        ids = self.ids
        if self.cfg.task.kind == "mlm":
            b, s = ids.shape
            pos = torch.rand(b, s).topk(self.p, dim=1).indices  # masked positions, like jtl
            labels = ids.gather(1, pos)
            ids = ids.scatter(1, pos, 4)
            if self.full_head:
                full = torch.full_like(ids, -100).scatter(1, pos, labels)
                loss = self.model(input_ids=ids, labels=full).loss
            else:
                h = self.model.bert(input_ids=ids).last_hidden_state
                h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
                logits = self.model.cls(h)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            logits = self.model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     self.targets.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


def timed(fn, n: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call. CPU seconds
    (all threads) are less sensitive to other jobs on shared cores than wall time."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _torch_worker(conn, cfg, host, full_head: bool, threads: int):
    """The PyTorch side in its own process: builds the model, then times ``n`` steps per
    request and answers (median wall s, median CPU s, this process's CPU seconds so far)."""
    torch.set_num_threads(threads)
    side = TorchSide(cfg, host, full_head)
    conn.send("ready")
    while (n := conn.recv()) is not None:
        wall, cpu = timed(side.step, n)
        t = os.times()
        conn.send((wall, cpu, t.user + t.system))


class TorchWorker:
    """``timed(n)`` for a PyTorch side that runs in a separate process, so that neither
    framework's allocator, thread pools or caches share a process with the other's."""

    def __init__(self, cfg, host, full_head: bool, threads: int):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker, args=(child, cfg, host, full_head, threads), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise SystemExit("the PyTorch worker did not start")
        self.cpu_s = 0.0

    def timed(self, n: int) -> tuple[float, float]:
        self.conn.send(n)
        wall, cpu, self.cpu_s = self.conn.recv()
        return wall, cpu

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


def one_round(r, preset, batch, seq, tokens, jtl_step, torch_timed, steps) -> dict:
    """One jtl turn then one PyTorch turn; ``torch_timed(n)`` -> (median wall s, CPU s)."""
    tj, cj = timed(jtl_step, steps)
    tt, ct = torch_timed(steps)
    print(f"[peer] {preset} b{batch} s{seq} round {r}: jtl {tokens / tj:.0f} tok/s, "
          f"torch {tokens / tt:.0f} tok/s, ratio {tt / tj:.2f}, CPU-time ratio {ct / cj:.2f}",
          file=sys.stderr, flush=True)
    return {"jtl_step_s": tj, "torch_step_s": tt, "ratio": tt / tj,
            "jtl_cpu_s": cj, "torch_cpu_s": ct, "cpu_ratio": ct / cj}


def jtl_side(cfg):
    """(step(): one timed-ready jtl train step on a fixed synthetic batch, the compiled
    program, compile seconds), one device."""
    mesh = S.make_mesh((1, 1, 1))
    setup = build(cfg, bench.task_spec(cfg), mesh, total_steps=10_000)
    gbatch = S.global_batch(mesh, bench.synthetic_batch(cfg))
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(setup.state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    state = {"s": setup.state}
    setup.state = None

    def step():
        state["s"], m = compiled(state["s"], gbatch, *setup.train_step.bound_args())
        jax.block_until_ready((state["s"], m))

    return step, compiled, compile_s


def compare(preset: str, batch: int, seq: int, rounds: int, steps: int, full_head: bool, peak: float,
            warmup: int = 2, overrides=(), same_process: bool = False, threads: int = 2) -> dict:
    cfg = bench.bench_config(preset, batch, seq, "float32", overrides)
    spec = bench.task_spec(cfg)
    host = bench.synthetic_batch(cfg)
    jtl_step, _, compile_s = jtl_side(cfg)
    worker = None
    if same_process:
        side = TorchSide(cfg, host, full_head)
        torch_timed = lambda n: timed(side.step, n)  # noqa: E731
    else:
        worker = TorchWorker(cfg, host, full_head, threads)
        torch_timed = worker.timed
    for _ in range(warmup):  # first calls allocate
        jtl_step()
    torch_timed(warmup)
    tokens = batch * seq
    try:
        with bench.Quiet(f"peer {preset}", helpers_cpu_s=(lambda: worker.cpu_s) if worker else None) as quiet:
            per_round = [one_round(r, preset, batch, seq, tokens, jtl_step, torch_timed, steps)
                         for r in range(rounds)]
    finally:
        if worker:
            worker.close()
    print(f"[peer] {preset}: {quiet.describe()}", file=sys.stderr, flush=True)

    flops = train_flops_per_step(cfg.model, batch, seq, cfg.task.kind, spec.max_predictions)
    jt = statistics.median(p["jtl_step_s"] for p in per_round)
    tt = statistics.median(p["torch_step_s"] for p in per_round)
    return {"preset": preset, "batch": batch, "seq": seq, "dtype": "float32", "task": cfg.task.kind,
            "torch_head": "full (stock HF labels=)" if full_head else "masked positions only",
            "jtl_compile_s": compile_s, "rounds": per_round, "quiet": quiet.report(),
            "torch_process": "the same as jtl's" if same_process else "its own (a worker process)",
            "ratio_median": statistics.median(p["ratio"] for p in per_round),
            "cpu_ratio_median": statistics.median(p["cpu_ratio"] for p in per_round),
            "jtl_cpu_s_per_step": statistics.median(p["jtl_cpu_s"] for p in per_round),
            "torch_cpu_s_per_step": statistics.median(p["torch_cpu_s"] for p in per_round),
            "ratio_min": min(p["ratio"] for p in per_round), "ratio_max": max(p["ratio"] for p in per_round),
            "jtl_tokens_per_s": tokens / jt, "torch_tokens_per_s": tokens / tt,
            "model_flops_per_step": flops, "peak_flops": peak,
            "jtl_mfu": flops / jt / peak, "torch_mfu": flops / tt / peak,
            "torch_mfu_note": "same FLOP count for both sides" if (cfg.task.kind != "mlm" or not full_head)
            else "stock HF head also projects unmasked positions: its real FLOPs are higher"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="minilm-l6:32,bert-base:16", help="preset:batch,...")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    p.add_argument("--torch-full-head", action="store_true")
    p.add_argument("--same-process", action="store_true",
                   help="run PyTorch in jtl's process (default: its own worker process, taking turns)")
    p.add_argument("--out", default="runs/bench/peer")
    p.add_argument("--note", default="", help="what else was running (recorded in the report)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    jp, tp = bench.measure_host_peak(), torch_peak()
    peak = max(jp, tp)
    print(f"[peer] host float32 matmul peak: XLA {jp / 1e9:.1f}, torch {tp / 1e9:.1f} GFLOP/s", file=sys.stderr)
    results = []
    for item in args.presets.split(","):
        name, _, b = item.partition(":")
        results.append(compare(name, int(b or 32), args.seq, args.rounds, args.steps, args.torch_full_head,
                               peak, args.warmup, same_process=args.same_process, threads=args.threads))
        write(args, results, jp, tp)  # after each preset, so a long run keeps what it finished
    return 0


def quiet_cell(r) -> str:
    q = r.get("quiet")
    if not q:
        return "not recorded"
    share = "?" if q["others_cpu_share"] is None else f"{100 * q['others_cpu_share']:.0f}%"
    return f"{q['load_1min_at_start']}/{q['load_1min_after']}, {share}" + ("" if q["quiet"] else " **NOT QUIET**")


def write(args, results, jp, tp):
    import transformers
    rows = [[r["preset"], r["batch"], r["seq"], r["torch_head"], f"{r['jtl_tokens_per_s']:.0f}",
             f"{r['torch_tokens_per_s']:.0f}",
             f"**{r['ratio_median']:.2f}x** [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]",
             f"{r['cpu_ratio_median']:.2f}x",
             f"{100 * r['jtl_mfu']:.1f}%", f"{100 * r['torch_mfu']:.1f}%", quiet_cell(r)] for r in results]
    table = bench.md_table(["preset", "batch", "seq", "PyTorch MLM head", "jtl tokens/s", "PyTorch tokens/s",
                            "ratio jtl/PyTorch median [min-max]",
                            "CPU-seconds ratio PyTorch/jtl", "jtl MFU", "PyTorch MFU",
                            "load at start/after, others' CPU share"], rows)
    machine = {**bench.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
               "torch_threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "peer_pytorch", "command": " ".join(sys.argv), "note": args.note, "machine": machine,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "host_peak_xla": jp, "host_peak_torch": tp, "results": results}
    (out / "peer_pytorch.json").write_text(json.dumps(doc, indent=1))
    mach = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    (out / "peer_pytorch.md").write_text(
        f"# jtl vs Hugging Face PyTorch (fp32, AdamW, alternating; PyTorch in "
        f"{'the same process' if args.same_process else 'its own process'})\n\n`{doc['command']}` "
        f"at {doc['time_utc']}\n\n{table}\n\nHost float32 matmul peak: XLA {jp / 1e9:.1f} GFLOP/s, "
        f"torch {tp / 1e9:.1f} GFLOP/s (MFU uses the larger). Running alongside: {args.note or 'not recorded'}."
        f"\n\nMachine:\n{mach}\n")
    plot(results, out / "peer_pytorch.png")
    print(table, flush=True)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r["jtl_tokens_per_s"] for r in results], 0.4, label="jtl (JAX)")
    ax.bar(x + 0.2, [r["torch_tokens_per_s"] for r in results], 0.4, label="HF PyTorch")
    for i, r in enumerate(results):
        ax.text(i, max(r["jtl_tokens_per_s"], r["torch_tokens_per_s"]), f"{r['ratio_median']:.2f}x",
                ha="center", va="bottom")
    ax.set_xticks(x, [f"{r['preset']} b{r['batch']} s{r['seq']}" for r in results])
    ax.set_ylabel("tokens / s (fp32 train step)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
