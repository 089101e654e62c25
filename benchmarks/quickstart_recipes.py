"""Why the quick start's pretrained model does not beat scratch: pretrain once, then
fine-tune both arms (MLM-pretrained / random init, same tokenizer) with several recipes.

    python benchmarks/quickstart_recipes.py --out runs/qs-recipes \
        [--pretrain key=value ...] --recipe "train.eval_every=63" \
        --recipe "train.eval_every=125,optim.lr=3e-3,train.epochs=8,optim.freeze=[backbone]"

Each recipe is comma-separated overrides of the quickstart-finetune preset. Prints one
JSON line per recipe: best/last validation accuracy and history of each arm, and the gain.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "qs-recipes"))
    ap.add_argument("--pretrain", nargs="*", default=[], help="overrides of quickstart-pretrain")
    ap.add_argument("--recipe", action="append", default=[], help="comma-separated finetune overrides")
    args = ap.parse_args()
    from jtl import config
    from jtl.finetune import finetune
    from jtl.pretrain import pretrain
    out, data = Path(args.out), ROOT / "examples" / "data"
    pre = out / "pretrain"
    s = pretrain(config.load("quickstart-pretrain", [f"run_dir={pre}", f"data.train={data / 'reviews_unlabelled.txt'}",
                                                     "checkpoint.resume=false", "train.progress=false",
                                                     *args.pretrain]))
    print(json.dumps({"pretrain": {k: s[k] for k in ("train_loss", "train_accuracy", "steps", "train_wall_s")}}),
          flush=True)
    common = [f"data.train={data / 'sst2_train_2k.jsonl'}", f"data.validation={data / 'sst2_validation.jsonl'}",
              "checkpoint.resume=false", "train.progress=false"]
    for recipe in args.recipe or [""]:
        extra = [kv for kv in recipe.split(",") if kv]
        row = {"recipe": extra}
        for arm, init in (("pretrained", f"model.init_from={pre}"), ("scratch", f"data.tokenizer={pre / 'tokenizer'}")):
            t = time.time()
            r = finetune(config.load("quickstart-finetune", [f"run_dir={out / ('ft-' + arm)}", *common, init, *extra]))
            row[arm] = {"best": r["final"]["validation"]["accuracy"],
                        "history": [round(h["accuracy"], 4) for h in r["history"]], "s": round(time.time() - t)}
        row["gain_points"] = round(100 * (row["pretrained"]["best"] - row["scratch"]["best"]), 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
