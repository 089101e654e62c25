"""jtl quick start: the transfer-learning story on a CPU in a few minutes.

1. Pretrain a tiny BERT-style encoder with masked LM on 30,000 unlabelled
   movie-review sentences (examples/data/reviews_unlabelled.txt).
2. Fine-tune it on 2,000 labelled SST-2 sentences, evaluate on the 872 SST-2
   validation sentences.
3. Fine-tune the same architecture from scratch (same tokenizer, same data,
   same hyperparameters) and print the gain that pretraining bought.

Usage: python examples/quickstart.py [--out runs/quickstart] [--pretrain-steps N]
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "quickstart"))
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: the quickstart-pretrain preset's (3000)")
    ap.add_argument("--finetune-epochs", type=float, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jtl").setLevel(logging.INFO)

    from jtl import config
    from jtl.finetune import finetune
    from jtl.pretrain import pretrain

    out = Path(args.out)
    data = REPO / "examples" / "data"
    t0 = time.perf_counter()

    print("== 1/3 pretraining a tiny encoder with masked LM on unlabelled reviews ==", flush=True)
    over = [f"run_dir={out / 'pretrain'}", f"data.train={data / 'reviews_unlabelled.txt'}",
            "checkpoint.resume=false"]
    if args.pretrain_steps:
        over.append(f"train.steps={args.pretrain_steps}")
    pre = pretrain(config.load("quickstart-pretrain", over))
    print(f"   MLM loss {pre['train_loss']:.3f}, masked-token accuracy {pre['train_accuracy']:.1%} "
          f"after {pre['steps']} steps ({pre['train_wall_s']:.0f} s)\n", flush=True)

    common = [f"data.train={data / 'sst2_train_2k.jsonl'}", f"data.validation={data / 'sst2_validation.jsonl'}",
              "checkpoint.resume=false"]
    if args.finetune_epochs:
        common.append(f"train.epochs={args.finetune_epochs}")
    results = {}
    for name, extra in (("pretrained", [f"model.init_from={out / 'pretrain'}"]),
                        ("scratch", [f"data.tokenizer={out / 'pretrain' / 'tokenizer'}"])):
        step = 2 if name == "pretrained" else 3
        print(f"== {step}/3 fine-tuning on 2,000 labelled sentences, {name} ==", flush=True)
        cfg = config.load("quickstart-finetune", [f"run_dir={out / ('finetune-' + name)}", *common, *extra])
        summary = finetune(cfg)
        results[name] = summary
        print(f"   validation accuracy {summary['final']['validation']['accuracy']:.1%}\n", flush=True)

    gain = results["pretrained"]["final"]["validation"]["accuracy"] - results["scratch"]["final"]["validation"]["accuracy"]
    print("== result: SST-2 validation accuracy (872 sentences) ==")
    print(f"   from scratch          {results['scratch']['final']['validation']['accuracy']:.1%}")
    print(f"   MLM-pretrained        {results['pretrained']['final']['validation']['accuracy']:.1%}")
    print(f"   gain from pretraining {100 * gain:+.1f} points   (total {time.perf_counter() - t0:.0f} s)")
    if gain <= 0:
        print("   (a few CPU minutes of MLM on 30k sentences is a small budget: raise --pretrain-steps, or\n"
              "    start from real pretrained weights with model.init_from, see configs/sst2-minilm.yaml)")
    (out / "quickstart.json").write_text(json.dumps(
        {"pretrain": pre, "finetune": {k: v["final"]["validation"] for k, v in results.items()},
         "gain_points": 100 * gain}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
