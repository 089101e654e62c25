"""Fine-tune the same weights on the same task with jtl and with a plain
Hugging Face Transformers + PyTorch loop, one after the other in one run, and
report both metrics and the wall-clock ratio.

    python benchmarks/finetune_vs_pytorch.py conll2003 [--only torch|jtl] [key=value ...]
    python benchmarks/finetune_vs_pytorch.py mrpc data.max_examples=256 train.epochs=1  # smoke run

Both sides take their hyperparameters from the jtl preset (``configs/<task>-minilm.yaml``
plus the overrides): weights (``model.init_from``), epochs, batch, lr, warmup
ratio, weight decay, eps, clip norm, seq_len, eval batch. Both see the very same
token ids: the rows are read and encoded once by ``jtl.data.tasks``. Both are
scored by the same code (``jtl.finetune.score``: entity F1 is checked against
seqeval in the tests) and report the test split at the epoch/step with the best
validation metric.

The PyTorch loop is what a user would write (and what ../shared/baselines ran):
``AutoModelFor{Sequence,Token}Classification``, AdamW with no decay on biases and
LayerNorm, linear warmup then linear decay to 0, ``clip_grad_norm_``, batches
shuffled by a numpy permutation per epoch and padded to their longest row,
fp32, ``torch.set_num_threads(os.cpu_count())``; validation (and test) after
each epoch. jtl runs its own loop (``jtl.finetune.finetune``: length buckets,
eval every ``train.eval_every`` steps).

Wall-clock on each side counts everything from model load to the last test
metric (jtl: including XLA compilation). Writes
``benchmarks/results/vs_pytorch_<task>.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {"sst2": "sst2-minilm", "mrpc": "mrpc-minilm", "conll2003": "conll2003-minilm",
           "stsb": "stsb-minilm"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def torch_finetune(cfg, enc: dict, log_every: int = 50) -> dict:
    """The plain PyTorch loop on jtl-encoded splits; returns metrics per epoch and timings."""
    import torch
    import transformers as tf
    from jtl import finetune as F
    from jtl.optim import schedule

    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    kind, n_labels = cfg.task.kind, F.num_labels(cfg)
    auto = {"token_classification": tf.AutoModelForTokenClassification}.get(
        kind, tf.AutoModelForSequenceClassification)
    if kind not in ("classification", "token_classification", "regression"):
        raise SystemExit(f"task.kind={kind!r}: the PyTorch side covers classification, regression "
                         "and token classification")
    kw = {"problem_type": "regression"} if kind == "regression" else {}
    model = auto.from_pretrained(cfg.model.init_from, num_labels=n_labels, **kw)
    o = cfg.optim
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    tr = enc["train"]
    n, B = len(tr), cfg.train.batch_size
    per_epoch = -(-n // B)
    epochs = int(round(cfg.train.epochs))
    total = per_epoch * epochs
    sched_fn = schedule(o, total)  # the same warmup + decay curve as jtl's optax schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(sched_fn(s)) / o.lr)
    has_types = "token_type_ids" in tr.arrays

    def batch_of(e, idx):
        w = int(e.lengths[idx].max())
        b = {"input_ids": torch.from_numpy(e.arrays["input_ids"][idx, :w].astype(np.int64)),
             "attention_mask": torch.from_numpy((e.arrays["segment_ids"][idx, :w] > 0).astype(np.int64))}
        if has_types:
            b["token_type_ids"] = torch.from_numpy(e.arrays["token_type_ids"][idx, :w].astype(np.int64))
        lab = e.arrays.get("labels")
        if lab is not None:
            lab = lab[idx, :w] if lab.ndim == 2 else lab[idx]
            b["labels"] = torch.from_numpy(lab.astype(np.float32 if kind == "regression" else np.int64))
        return b, w

    def evaluate(e):
        t = time.perf_counter()
        model.eval()
        logits = None
        bs = cfg.train.eval_batch_size or B
        with torch.no_grad():
            for at in range(0, len(e), bs):
                idx = np.arange(at, min(at + bs, len(e)))
                b, w = batch_of(e, idx)
                b.pop("labels", None)
                out = model(**b).logits.float().numpy()
                if logits is None:
                    shape = (len(e), e.arrays["input_ids"].shape[1], n_labels) if out.ndim == 3 \
                        else (len(e), out.shape[-1])
                    logits = np.zeros(shape, np.float32)
                if out.ndim == 3:
                    logits[idx, :w] = out
                else:
                    logits[idx] = out
        model.train()
        return {**F.score(cfg, e, logits), "n": int(e.n_rows), "eval_s": round(time.perf_counter() - t, 2)}

    setup_s = time.perf_counter() - t_start
    history, step, real, padded, train_s = [], 0, 0, 0, 0.0
    model.train()
    for ep in range(epochs):
        perm = np.random.default_rng(cfg.train.seed + ep).permutation(n)
        t_ep = time.perf_counter()
        for at in range(0, n, B):
            idx = perm[at:at + B]
            b, w = batch_of(tr, idx)
            loss = model(**b).loss
            loss.backward()
            if o.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            real += int(tr.lengths[idx].sum())
            padded += w * len(idx)
            if step % log_every == 0 or step == total:
                el = train_s + time.perf_counter() - t_ep
                _log(f"torch step {step}/{total} loss {loss.item():.4f} real tok/s {real / el:.0f} "
                     f"ETA {el / step * (total - step):.0f}s")
        train_s += time.perf_counter() - t_ep
        ev = {s: evaluate(enc[s]) for s in ("validation", "test") if s in enc}
        history.append({"epoch": ep + 1, "step": step, **ev})
        _log(f"torch epoch {ep + 1}: " + json.dumps({s: {k: round(v, 4) for k, v in m.items()
                                                           if isinstance(v, float)} for s, m in ev.items()}))
    metric = F.metric_name(cfg)
    best = max(history, key=lambda h: h["validation"][metric]) if "validation" in enc else history[-1]
    return {"best_epoch": best["epoch"], "final": {s: best[s] for s in ("validation", "test") if s in best},
            "history": history, "steps": step, "train_s": round(train_s, 2), "setup_s": round(setup_s, 2),
            "real_tokens_per_s": real / max(train_s, 1e-9), "padded_tokens_per_s": padded / max(train_s, 1e-9),
            "padding_fraction": 1 - real / max(padded, 1),
            "wall_s": round(time.perf_counter() - t_start, 2),
            "versions": {"torch": torch.__version__, "transformers": tf.__version__},
            "threads": torch.get_num_threads()}


def jtl_finetune(cfg) -> dict:
    from jtl.finetune import finetune
    t = time.perf_counter()
    s = finetune(cfg)
    return {"best_step": s["best_step"], "final": s["final"], "history": s["history"],
            "steps": s["steps_run"], "train_s": s["train_wall_s"], "setup_s": s["setup_s"],
            "real_tokens_per_s": s["real_tokens_per_s"], "padded_tokens_per_s": s["padded_tokens_per_s"],
            "padding_fraction": s["padding_fraction"], "wall_s": round(time.perf_counter() - t, 2)}


def _cpu() -> dict:
    from jtl.bench_report import machine
    return {k: v for k, v in machine().items() if k.startswith("lscpu")}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(PRESETS))
    ap.add_argument("--only", choices=("torch", "jtl"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse-torch", metavar="JSON", help="take the PyTorch side from an earlier output "
                    "of this script (same task and overrides) instead of running it again")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.chdir(ROOT)
    from jtl import bench, config
    from jtl import finetune as F
    # A fresh jtl run each time (an earlier run's checkpoints are moved aside, not resumed).
    cfg = config.load(PRESETS[args.task], [f"run_dir=runs/vs-pytorch-{args.task}", "train.progress=false",
                                           "checkpoint.resume=false"] + overrides)
    if not cfg.model.init_from or not Path(cfg.model.init_from).exists():
        raise SystemExit(f"model.init_from={cfg.model.init_from!r} not found: fetch the weights first "
                         "(see configs/sst2-minilm.yaml)")
    out = {"task": args.task, "preset": PRESETS[args.task],
           "command": " ".join(["python", "benchmarks/finetune_vs_pytorch.py"] + argv),
           "hyperparameters": {"weights": cfg.model.init_from, "epochs": cfg.train.epochs,
                               "batch": cfg.train.batch_size, "lr": cfg.optim.lr,
                               "warmup_ratio": cfg.optim.warmup_ratio, "weight_decay": cfg.optim.weight_decay,
                               "clip_norm": cfg.optim.clip_norm, "seq_len": cfg.data.seq_len,
                               "seed": cfg.train.seed, "dropout": cfg.model.dropout},
           "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_1min_at_start": os.getloadavg()[0], **_cpu()}}
    if args.reuse_torch and args.only != "jtl":
        prev = json.loads(Path(args.reuse_torch).read_text())
        if prev.get("task") != args.task or prev.get("hyperparameters") != out["hyperparameters"]:
            raise SystemExit(f"{args.reuse_torch}: another task or other hyperparameters than this run")
        out["torch"] = {**prev["torch"], "reused_from": {"file": args.reuse_torch, "command": prev["command"],
                                                         "host": prev["host"]}}
        _log(f"torch: reused from {args.reuse_torch} ({out['torch']['wall_s']} s)")
    elif args.only != "jtl":
        pcfg, tok, rows = F.prepare(cfg)
        enc = {s: F.encode_split(pcfg, r, tok) for s, r in rows.items() if r is not None}
        _log(f"torch: {len(enc['train'])} train rows, epochs {pcfg.train.epochs}")
        with bench.Quiet("vs-pytorch torch") as quiet:
            out["torch"] = torch_finetune(pcfg, enc)
        out["torch"]["quiet"] = quiet.report()
        _log(f"torch done in {out['torch']['wall_s']} s: {json.dumps(out['torch']['final'], default=float)}")
    if args.only != "torch":
        with bench.Quiet("vs-pytorch jtl") as quiet:
            out["jtl"] = jtl_finetune(cfg)
        out["jtl"]["quiet"] = quiet.report()
        _log(f"jtl done in {out['jtl']['wall_s']} s: {json.dumps(out['jtl']['final'], default=float)}")
    if "torch" in out and "jtl" in out:
        out["wall_ratio_torch_over_jtl"] = out["torch"]["wall_s"] / out["jtl"]["wall_s"]
        out["train_tokens_per_s_ratio_jtl_over_torch"] = (out["jtl"]["real_tokens_per_s"]
                                                          / out["torch"]["real_tokens_per_s"])
    out["host"]["load_1min_at_end"] = os.getloadavg()[0]
    dest = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"vs_pytorch_{args.task}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, default=float))
    metric = F.metric_name(cfg)
    for side in ("torch", "jtl"):
        if side in out:
            fin = out[side]["final"]
            print(f"{side:5s} " + "  ".join(f"{s} {metric} {fin[s][metric]:.4f}" for s in fin)
                  + f"  wall {out[side]['wall_s']:.0f} s")
    if "wall_ratio_torch_over_jtl" in out:
        print(f"wall-clock torch / jtl = {out['wall_ratio_torch_over_jtl']:.2f}x; wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
