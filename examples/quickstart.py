"""jtl quick start: what transfer learning buys, on a CPU in a few minutes.

1. Pretrain a tiny BERT-style encoder with masked LM on 30,000 unlabelled
   movie-review sentences (examples/data/reviews_unlabelled.txt).
2. Fine-tune it, and the same architecture from random weights (same tokenizer,
   same hyperparameters, same number of updates), on labelled SST-2 subsets of
   several sizes (a stratified sample of examples/data/sst2_train_2k.jsonl per
   seed: ``data.max_train_examples`` / ``data.sample_seed``), several seeds each,
   scoring the final model on the 872 SST-2 validation sentences.
3. Print the label-efficiency table (labels | scratch | pretrained | gain), draw it
   (OUT/label_efficiency.png) and write OUT/quickstart.json.

Usage: python examples/quickstart.py [--out runs/quickstart] [--budgets 50,200,2000]
                                     [--seeds 0,1,2] [--pretrain-steps N] [--finetune-steps N]
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"


def _eta(done: int, total: int, t0: float) -> str:
    if done == 0:
        return "ETA --"
    left = (time.perf_counter() - t0) / done * (total - done)
    return f"ETA {int(left // 60)}m{int(left % 60):02d}s"


def pretrain_phase(out: Path, steps: int | None, extra=()) -> dict:
    from jtl import config
    from jtl.pretrain import pretrain
    over = [f"run_dir={out / 'pretrain'}", f"data.train={DATA / 'reviews_unlabelled.txt'}", *extra]
    if steps:
        over.append(f"train.steps={steps}")
    return pretrain(config.load("quickstart-pretrain", over))


def finetune_phase(out: Path, budgets: list[int], seeds: list[int], steps: int | None, extra=()) -> list[dict]:
    """Both arms on every budget and seed; one row per budget."""
    from jtl import config
    from jtl.finetune import finetune
    from jtl.run.seeds import mean_std, run_seeds
    common = [f"data.train={DATA / 'sst2_train_2k.jsonl'}", f"data.validation={DATA / 'sst2_validation.jsonl'}",
              "train.progress=false", *extra]
    if steps:
        common.append(f"train.steps={steps}")
    arms = {"scratch": [f"data.tokenizer={out / 'pretrain' / 'tokenizer'}"],
            "pretrained": [f"model.init_from={out / 'pretrain'}"]}
    total, done, t0 = len(budgets) * len(seeds) * len(arms), 0, time.perf_counter()

    def train(cfg):
        nonlocal done
        summary = finetune(cfg)
        done += 1
        acc = summary["final"]["validation"]["accuracy"]
        print(f"   [{done:>2}/{total}] {cfg.data.max_train_examples:>5} labels, seed {cfg.data.sample_seed}, "
              f"{cfg.out_dir.parent.parent.name:<10} accuracy {acc:.1%}  ({_eta(done, total, t0)})", flush=True)
        return summary

    rows = []
    for n in budgets:
        row = {"labels": n}
        for arm, init in arms.items():
            cfg = config.load("quickstart-finetune", [f"run_dir={out / arm / f'labels-{n}'}", *common, *init,
                                                      f"data.max_train_examples={n}"])
            res = run_seeds(cfg, seeds, train=train)
            accs = [r["accuracy"] for r in res["runs"]]
            row[f"{arm}_mean"], row[f"{arm}_std"] = mean_std(accs)
            row[f"{arm}_runs"] = accs
        row["gain"] = row["pretrained_mean"] - row["scratch_mean"]
        rows.append(row)
    return rows


def scored_on(finetune_overrides) -> str:
    """What the accuracies are measured on: SST-2 validation, or the file a
    ``data.validation=`` override names (benchmarks/quickstart_dev.py's dev split)."""
    for o in finetune_overrides:
        if o.startswith("data.validation="):
            return f"accuracy on {Path(o.split('=', 1)[1]).name}"
    return "SST-2 validation accuracy"


def table(rows: list[dict], seeds: list[int], metric: str = "SST-2 validation accuracy") -> str:
    lines = [f"   {'labels':>6} | {'scratch':>14} | {'pretrained':>14} | {'gain':>7}   "
             f"({metric}, mean ± std over {len(seeds)} seeds)"]
    for r in rows:
        lines.append(f"   {r['labels']:>6} | {100 * r['scratch_mean']:6.1f} ± {100 * r['scratch_std']:4.1f}  "
                     f"| {100 * r['pretrained_mean']:6.1f} ± {100 * r['pretrained_std']:4.1f}  "
                     f"| {100 * r['gain']:+6.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, seeds: list[int], metric: str = "SST-2 validation accuracy") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["labels"] for r in rows]
    for arm, style in (("scratch", "s--"), ("pretrained", "o-")):
        ax.errorbar(xs, [100 * r[f"{arm}_mean"] for r in rows], yerr=[100 * r[f"{arm}_std"] for r in rows],
                    fmt=style, capsize=4, label=f"{arm} (mean ± std, {len(seeds)} seeds)")
    ax.axhline(50, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("labelled training sentences")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Label efficiency: MLM pretraining vs random init")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "quickstart"))
    ap.add_argument("--budgets", default="50,200,2000", help="labelled-subset sizes")
    ap.add_argument("--seeds", default="0,1,2", help="subset/initialisation seeds per budget")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: the quickstart-pretrain preset's")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default: the quickstart-finetune preset's")
    ap.add_argument("--pretrain", nargs="*", default=[], help="overrides of the quickstart-pretrain preset")
    ap.add_argument("--finetune", nargs="*", default=[], help="overrides of the quickstart-finetune preset")
    args = ap.parse_args(argv)
    out = Path(args.out)
    # Every fine-tuning run compiles the same programs: keep them in a persistent cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla-cache"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from jtl.run.seeds import parse_seeds
    budgets = sorted(int(b) for b in args.budgets.split(","))
    seeds = parse_seeds(args.seeds)
    t0 = time.perf_counter()

    print("== 1/3 pretraining a tiny encoder with masked LM on 30,000 unlabelled reviews ==", flush=True)
    pre = pretrain_phase(out, args.pretrain_steps, args.pretrain)
    print(f"   MLM loss {pre['train_loss']:.3f}, masked-token accuracy {pre['train_accuracy']:.1%} "
          f"after {pre['steps']} steps ({pre['train_wall_s']:.0f} s)\n", flush=True)

    print(f"== 2/3 fine-tuning, pretrained and from scratch, on {', '.join(map(str, budgets))} labels "
          f"x {len(seeds)} seeds ==", flush=True)
    logging.getLogger("jtl").setLevel(logging.ERROR)  # per-run notes (truncated rows, new head) x18
    rows = finetune_phase(out, budgets, seeds, args.finetune_steps, args.finetune)

    print("\n== 3/3 label efficiency: what pretraining on unlabelled text buys ==")
    metric = scored_on(args.finetune)
    print(table(rows, seeds, metric))
    lo, hi = rows[0], rows[-1]
    noise = max(lo["scratch_std"], lo["pretrained_std"])
    print(f"   with {lo['labels']} labels pretraining is worth {100 * lo['gain']:+.1f} points "
          f"(seed std up to {100 * noise:.1f}); with {hi['labels']} labels {100 * hi['gain']:+.1f}.")
    if lo["gain"] < 0.05:
        print("   A few CPU minutes of MLM on 30k sentences is a small pretraining budget; pretrained\n"
              "   MiniLM weights (below) reach about 90% on SST-2. Whether a gain holds on other held-out\n"
              "   sentences: benchmarks/quickstart_dev.py (README, 'The quick start').")
    png = out / "label_efficiency.png"
    plot(rows, png, seeds, metric)
    wall = time.perf_counter() - t0
    (out / "quickstart.json").write_text(json.dumps(
        {"pretrain": {k: pre[k] for k in ("train_loss", "train_accuracy", "steps", "train_wall_s")},
         "seeds": seeds, "budgets": rows, "total_wall_s": round(wall, 1)}, indent=2, default=float))
    print(f"   plot: {png}\n   numbers: {out / 'quickstart.json'}   (total {wall:.0f} s)")
    print("\nThe real thing: fine-tune pretrained MiniLM on full SST-2 with `jtl train configs/sst2-minilm.yaml`\n"
          "(weights and data offline: see ../shared/data/README.md and the README's 'Pretrained weights').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
