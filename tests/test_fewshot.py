"""Few-shot subsets, multi-seed runs and the quick start's label-efficiency path."""
from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from jtl import config as C
from jtl.config import ConfigError
from jtl.data import fewshot
from jtl.data.sources import DataError, Row
from jtl.run import seeds as S

from test_finetune import TINY, cls_rows, run, write_jsonl


def rows_of(labels):
    return [Row({"text": f"t{i}", "label": y}, f"train.jsonl:{i + 1}") for i, y in enumerate(labels)]


def cfg_of(**over):
    return C.Config().replace(**{"task.kind": "classification", "data.train": "train.jsonl", **over})


def test_subset_is_stratified_reproducible_and_nested():
    rows = rows_of(["pos"] * 55 + ["neg"] * 45)
    labels = ("neg", "pos")
    a = fewshot.subset(rows, cfg_of(**{"data.max_train_examples": 20, "data.sample_seed": 3}), labels)
    assert Counter(r.data["label"] for r in a) == {"pos": 11, "neg": 9}  # 55/45 of 20
    b = fewshot.subset(rows, cfg_of(**{"data.max_train_examples": 20, "data.sample_seed": 3}), labels)
    assert [r.where for r in a] == [r.where for r in b]  # same seed, same rows
    c = fewshot.subset(rows, cfg_of(**{"data.max_train_examples": 20, "data.sample_seed": 4}), labels)
    assert [r.where for r in a] != [r.where for r in c]
    big = fewshot.subset(rows, cfg_of(**{"data.max_train_examples": 60, "data.sample_seed": 3}), labels)
    assert {r.where for r in a} <= {r.where for r in big}  # budgets are nested per seed
    k = fewshot.subset(rows, cfg_of(**{"data.examples_per_label": 7}), labels)
    assert Counter(r.data["label"] for r in k) == {"pos": 7, "neg": 7}
    # A rare label still gets a row when the budget allows.
    rare = fewshot.subset(rows_of(["a"] * 98 + ["b"] * 2), cfg_of(**{"data.max_train_examples": 10}), ("a", "b"))
    assert Counter(r.data["label"] for r in rare) == {"a": 9, "b": 1}
    assert fewshot.subset(rows, cfg_of(), labels) is rows  # no budget: all rows


def test_subset_errors_name_the_problem():
    rows = rows_of(["pos"] * 5 + ["neg"] * 2)
    with pytest.raises(DataError, match="'neg' have 2"):
        fewshot.subset(rows, cfg_of(**{"data.examples_per_label": 3}), ("neg", "pos"))
    with pytest.raises(DataError, match="train.jsonl:8.*unknown label 'odd'"):
        fewshot.subset(rows + rows_of(["pos"] * 7 + ["odd"]), cfg_of(**{"data.max_train_examples": 3}),
                       ("neg", "pos"))
    with pytest.raises(ConfigError, match="examples_per_label needs task.kind=classification"):
        fewshot.subset(rows, cfg_of(**{"task.kind": "regression", "data.examples_per_label": 2}), None)
    with pytest.raises(ConfigError, match="data.max_train_examples must be >= 1"):
        C.validate(cfg_of(**{"data.max_train_examples": 0}))
    with pytest.raises(ConfigError, match="not both"):
        C.validate(cfg_of(**{"data.max_train_examples": 5, "data.examples_per_label": 2}))


def test_finetune_trains_on_the_subset_only_and_never_samples_validation(tmp_path):
    train, val = cls_rows(200, 0), cls_rows(40, 1)
    for r in val:
        r["text"] += " validation"  # a word no training row has
    cfg, summary = run(tmp_path, "few", ["task.kind=classification", "train.steps=2",
                                         "data.max_train_examples=30", "data.sample_seed=5"], train, val)
    assert summary["train_rows"] == 30
    assert summary["final"]["validation"]["n"] == 40  # evaluation is never subsampled
    kept = fewshot.subset(
        [Row(r, f"{i}") for i, r in enumerate(train)], cfg, ("neg", "pos"))
    assert Counter(r.data["label"] for r in kept) == {"neg": 15, "pos": 15}
    assert not any("validation" in r.data["text"] for r in kept)


def test_seeds_run_each_seed_and_report_mean_and_std(tmp_path):
    assert S.parse_seeds("0,2") == [0, 2] and S.parse_seeds("1-3") == [1, 2, 3]
    with pytest.raises(ConfigError, match="--seeds"):
        S.parse_seeds("0,0")
    d = tmp_path / "data"
    d.mkdir()
    keys = [f"data.train={write_jsonl(d / 'train.jsonl', cls_rows(120, 0))}",
            f"data.validation={write_jsonl(d / 'val.jsonl', cls_rows(30, 1))}", f"run_dir={tmp_path / 'run'}",
            "task.kind=classification", "train.steps=3", "data.max_train_examples=40"]
    from jtl import cli
    rc = cli.main(["-q", "train", "tiny-mlm", *TINY, *keys, "--seeds", "0,1"])
    assert rc == 0
    out = json.loads((tmp_path / "run" / "seeds.json").read_text())
    assert out["metric"] == "accuracy" and out["seeds"] == [0, 1]
    accs = [r["accuracy"] for r in out["runs"]]
    for s, acc in zip((0, 1), accs):
        summary = json.loads((tmp_path / "run" / f"seed-{s}" / "summary.json").read_text())
        assert summary["final"]["validation"]["accuracy"] == acc
        cfg = C.load(str(tmp_path / "run" / f"seed-{s}" / "config.yaml"), [])
        assert (cfg.train.seed, cfg.data.sample_seed) == (s, s)
    assert out["mean"] == pytest.approx(sum(accs) / 2)
    assert out["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)


def test_quickstart_path_at_toy_size(tmp_path, repo, monkeypatch):
    """examples/quickstart.py end to end: pretrain, both arms on two budgets x two seeds,
    then the table, the JSON and the plot agree with the per-run summaries."""
    monkeypatch.syspath_prepend(str(repo / "examples"))
    import quickstart
    out = tmp_path / "qs"
    small = ["model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=2", "train.batch_size=16",
             "mesh.data=1"]
    rc = quickstart.main(["--out", str(out), "--budgets", "8,24", "--seeds", "0,1", "--pretrain-steps", "3",
                          "--finetune-steps", "2", "--pretrain", *small, "data.max_examples=400",
                          "data.tokenizer_vocab=256", "model.vocab_size=256", "--finetune",
                          *small, "data.tokenizer_vocab=256", "model.vocab_size=256",
                          "train.eval_batch_size=64", "data.max_examples=300"])
    assert rc == 0
    res = json.loads((out / "quickstart.json").read_text())
    assert [b["labels"] for b in res["budgets"]] == [8, 24]
    assert (out / "label_efficiency.png").stat().st_size > 1000
    for b in res["budgets"]:
        for arm in ("scratch", "pretrained"):
            accs = []
            for s in (0, 1):
                summary = json.loads((out / arm / f"labels-{b['labels']}" / f"seed-{s}" / "summary.json").read_text())
                assert summary["train_rows"] == b["labels"]
                accs.append(summary["final"]["validation"]["accuracy"])
            assert b[f"{arm}_mean"] == pytest.approx(sum(accs) / 2)
        assert b["gain"] == pytest.approx(b["pretrained_mean"] - b["scratch_mean"])
    assert sys.modules["quickstart"].table(res["budgets"], [0, 1]).count("\n") == 2
    qs = sys.modules["quickstart"]
    assert qs.scored_on([]) == "SST-2 validation accuracy"
    assert qs.scored_on(["train.steps=3", "data.validation=/x/dev.jsonl"]) == "accuracy on dev.jsonl"
    assert "accuracy on dev.jsonl" in qs.table(res["budgets"], [0, 1], qs.scored_on(["data.validation=dev.jsonl"]))
