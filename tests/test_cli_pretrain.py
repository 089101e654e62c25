"""Pretraining through the real CLI: loss goes down; bad configs/data fail loudly."""
import json

import pytest

from jtl.cli import main

SMALL = ["model.hidden=64", "model.layers=2", "model.heads=4", "model.mlp=128", "data.seq_len=32",
         "model.max_len=32", "data.max_examples=3000", "data.tokenizer_vocab=1000",
         "model.vocab_size=1000", "train.batch_size=32", "train.log_every=10", "train.progress=false",
         "optim.lr=2e-3", "mesh.data=1", "mesh.fsdp=2"]  # sharded params; every axis: test_sharded_parity


def losses(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("preset,steps", [("tiny-mlm", 60), ("tiny-clm", 40)])
def test_loss_goes_down(tmp_path, repo, preset, steps, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    run = tmp_path / "run"
    assert main(["train", preset, f"run_dir={run}", f"train.steps={steps}", *SMALL]) == 0
    ls = losses(run)
    # Per-batch losses are noisy (MLM draws new masks each step): average the last three.
    assert len(ls) >= 4 and sum(ls[-3:]) / 3 < ls[0] - 0.3, ls
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_real_tokens_per_s"] > 0 and 0 < summary["train_mfu"] < 1
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert (run / "checkpoints" / str(steps)).is_dir()
    assert list((run / "tb").iterdir())  # TensorBoard events
    # jtl eval takes fine-tuned runs: a pretraining run is refused saying what it is.
    assert main(["eval", str(run)]) == 2
    assert "pretraining run" in capsys.readouterr().err
    if preset == "tiny-clm":  # a decoder run generates from its own checkpoint (restored onto real devices)
        assert main(["generate", str(run), "--prompt", "the film", "--max-new-tokens", "4"]) == 0


def test_bad_config_exit_code_and_message(tmp_path, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["train", "tiny-mlm", "optim.learning_rate=1"]) == 2
    assert "unknown config key 'optim.learning_rate'" in capsys.readouterr().err
    assert main(["train", "tiny-mlm", "mesh.data=16", f"run_dir={tmp_path}"]) == 2
    assert "needs 16 devices but only 8" in capsys.readouterr().err
    assert main(["train", "tiny-mlm", "mesh.data=8", "train.batch_size=12", f"run_dir={tmp_path}"]) == 2
    assert "not divisible by mesh data x fsdp = 8" in capsys.readouterr().err


def test_tokenizer_bigger_than_model_vocab(tmp_path, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    args = ["train", "tiny-mlm", f"run_dir={tmp_path}", "data.max_examples=500", "model.vocab_size=100",
            "data.tokenizer_vocab=500"]
    assert main(args) == 2
    assert "model.vocab_size=100" in capsys.readouterr().err


def test_bad_data_row_named(tmp_path, capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine film"}\n{"txt": "oops"}\n')
    assert main(["train", "tiny-mlm", f"run_dir={tmp_path / 'r'}", f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: missing field 'text'" in err
