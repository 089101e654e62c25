"""Instruction-tune SmolLM2-135M-Instruct on SST-2 turned into prompt/response pairs
(task.kind=sft), then evaluate it by prompted label-word scoring as before tuning.

    python benchmarks/sft_sst2.py --weights weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --examples 2000 --steps 60 [--before benchmarks/results/prompted/smollm2_sst2.json]

Rows: prompt ``Review: {sentence}\\nSentiment:``, response `` positive`` / `` negative``
(``data.chat_template=false``: the same text ``jtl eval-prompted --template`` uses), a
stratified-free random sample of ``--examples`` SST-2 training rows (seed 0). The
tuned run is scored zero-shot on the SST-2 validation set by ``jtl.prompted.evaluate``
with the same template and label words; ``--before`` adds the untuned model's
results (``jtl eval-prompted ... --output``) to the table. Writes
``benchmarks/results/prompted/sft_sst2.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = ("negative", "positive")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data", default="../shared/data/sst2")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-eval", type=int, default=None, help="validation examples scored (default all)")
    p.add_argument("--before", default=None, help="jtl eval-prompted --output JSON of the untuned model")
    p.add_argument("--run-dir", default="runs/sft-sst2")
    p.add_argument("--eval-only", action="store_true", help="score the finished run in --run-dir again")
    p.add_argument("--out", default="benchmarks/results/prompted")
    args = p.parse_args(argv)
    from jtl import config as C
    from jtl import prompted
    from jtl.bench_report import machine
    from jtl.generate import load
    from jtl.pretrain import pretrain

    data = ROOT / args.data if not Path(args.data).is_absolute() else Path(args.data)
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    pick = np.random.default_rng(0).choice(len(rows), size=min(args.examples, len(rows)), replace=False)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    sft = run / "sft_train.jsonl"
    if not args.eval_only:
        sft.write_text("".join(json.dumps({"prompt": TEMPLATE.format(text=rows[i]["sentence"].strip()),
                                           "response": " " + WORDS[int(rows[i]["label"])]}) + "\n"
                               for i in pick))
    val = run / "sft_validation.jsonl"
    vrows = [json.loads(x) for x in (data / "validation.jsonl").read_text().splitlines()][:256]
    val.write_text("".join(json.dumps({"prompt": TEMPLATE.format(text=r["sentence"].strip()),
                                       "response": " " + WORDS[int(r["label"])]}) + "\n" for r in vrows))
    cfg = C.load("tiny-clm", [
        "task.kind=sft", f"model.init_from={args.weights}", f"data.train={sft}", f"data.validation={val}",
        "data.chat_template=false", "data.seq_len=128", f"train.batch_size={args.batch}",
        f"train.steps={args.steps}", f"optim.lr={args.lr}", "optim.warmup_ratio=0.1", "optim.weight_decay=0.0",
        "train.log_every=10", f"train.eval_every={args.steps}", f"run_dir={run}", "checkpoint.enabled=true",
        "checkpoint.resume=false", "mesh.data=1"])
    from jtl.bench import Quiet, write_doc
    with Quiet("sft-sst2 train") as q_train:
        if args.eval_only:
            summary = json.loads((run / "summary.json").read_text())
        else:
            summary = pretrain(cfg)
    train_s = summary["train_wall_s"]  # the training loop's wall-clock (its first step compiles)
    task = C.load(str(ROOT / "configs" / "sst2-minilm.yaml"), [])
    with Quiet("sft-sst2 eval") as q_eval:
        t0 = time.perf_counter()
        after = prompted.evaluate(load(run), task, shots=0, template=TEMPLATE, label_words=list(WORDS),
                                  max_examples=args.max_eval)
        eval_s = time.perf_counter() - t0
    after.pop("scores")
    before = json.loads(Path(args.before).read_text())["results"] if args.before else []
    doc = {"command": " ".join(["python", "benchmarks/sft_sst2.py"] + (argv or sys.argv[1:])),
           "weights": args.weights, "sft_examples": len(pick), "steps": args.steps, "batch": args.batch,
           "lr": args.lr, "train_wall_s": train_s, "eval_wall_s": eval_s, "summary": summary,
           "quiet": {"train": None if args.eval_only else q_train.report(), "eval": q_eval.report()},
           "before": before, "after": after, "machine": machine(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = ["| model | shots | SST-2 validation accuracy | most frequent prediction | predicted |", "|---|---|---|---|---|"]
    for r in before:
        lines.append(f"| SmolLM2-135M-Instruct | {r['shots']} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['majority_rate']:.0f}% | {r['predicted']} |")
    lines.append(f"| + SFT ({len(pick)} examples, {args.steps} steps of {args.batch}) | 0 | "
                 f"{100 * after['accuracy']:.1f}% | {100 * after['majority_rate']:.0f}% | {after['predicted']} |")
    table = "\n".join(lines)
    trained = "not recorded (--eval-only)" if args.eval_only else q_train.describe()
    write_doc(Path(args.out), "sft_sst2", doc, "SmolLM2-135M-Instruct on SST-2: prompted, before and after SFT",
              f"{table}\n\nSFT training loop {train_s:.0f} s (its first step compiles), evaluation "
              f"{eval_s:.0f} s; validation loss on the response tokens after SFT "
              f"{summary.get('validation_loss', float('nan')):.4f}. Template `{TEMPLATE!r}`, label words "
              f"{', '.join(WORDS)}. Machine while training: {trained}; while evaluating: {q_eval.describe()}.")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
