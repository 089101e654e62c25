"""Typed config: presets, overrides, and loud errors before anything compiles."""
import pytest

from jtl import config
from jtl.config import ConfigError


def test_preset_and_overrides():
    cfg = config.load("tiny-mlm", ["optim.lr=3e-5", "mesh.fsdp=2", "data.buckets=16,32"])
    assert cfg.optim.lr == 3e-5 and cfg.mesh.fsdp == 2
    assert cfg.data.buckets == (16, 32)
    assert cfg.model.family == "bert"
    with pytest.raises(Exception):
        cfg.optim.__setattr__("lr", 1.0)  # frozen


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean optim.lr"):
        config.load("tiny-mlm", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        config.load("tiny-mlm", ["modle.hidden=3"])


def test_wrong_type_and_literal():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer, got 'many'"):
        config.load("tiny-mlm", ["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"model.family: 'gpt5' is not one of 'bert', 'roberta', 'gpt2', 'llama'"):
        config.load("tiny-mlm", ["model.family=gpt5"])


def test_impossible_settings():
    with pytest.raises(ConfigError, match="model.hidden=130 is not divisible by model.heads=4"):
        config.load("tiny-mlm", ["model.hidden=130"])
    with pytest.raises(ConfigError, match="batch_size=30 is not divisible by train.microbatches=4"):
        config.load("tiny-mlm", ["train.batch_size=30", "train.microbatches=4"])
    from jtl.run.birth import resolve  # the family check runs once the architecture is final
    with pytest.raises(ConfigError, match="task.kind='mlm' needs an encoder"):
        resolve(config.load("tiny-clm", ["task.kind=mlm"]))
    with pytest.raises(ConfigError, match="task.kind='clm' needs a decoder"):
        resolve(config.load("tiny-mlm", ["task.kind=clm"]))
    with pytest.raises(ConfigError, match="exceeds model.max_len"):
        config.load("tiny-mlm", ["data.seq_len=512"])
    with pytest.raises(ConfigError, match="at most one of mesh"):
        config.load("tiny-mlm", ["mesh.data=-1", "mesh.fsdp=-1"])


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError, match="not found; presets: .*tiny-mlm"):
        config.load("no-such-preset")


def test_base_chain(tmp_path):
    (tmp_path / "child.yaml").write_text("base: tiny-mlm\noptim:\n  lr: 0.5\n")
    cfg = config.load(str(tmp_path / "child.yaml"))
    assert cfg.optim.lr == 0.5 and cfg.model.hidden == 128


@pytest.mark.parametrize("key,value,match", [
    ("optim.lr", "-1e-3", r"optim\.lr must be > 0"),
    ("optim.lr", "0", r"optim\.lr must be > 0"),
    ("optim.weight_decay", "-0.1", r"optim\.weight_decay must be >= 0"),
    ("optim.warmup_ratio", "1.5", r"optim\.warmup_ratio must be in"),
    ("optim.b2", "1.0", r"optim\.b2 must be in"),
    ("optim.clip_norm", "0", r"optim\.clip_norm must be > 0"),
    ("task.label_smoothing", "1.0", r"task\.label_smoothing must be in"),
])
def test_out_of_range_optimizer_keys_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, [f"{key}={value}"])


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=50 exceeds train\.steps=10"):
        config.load(None, ["optim.warmup_steps=50", "train.steps=10"])


def test_label_one_as_text_and_as_int_is_one_label():
    from jtl.data.sources import Row
    from jtl.data.tasks import infer_labels
    rows = [Row({"text": "a", "label": v}, f"f:{i}") for i, v in enumerate([0, 1, "1", 1, 0, 10, 2])]
    cfg = config.load(None, ["task.kind=classification"])
    assert infer_labels(rows, cfg, "value") == ("0", "1", "2", "10")
    rows = [Row({"text": "a", "label": v}, f"f:{i}") for i, v in enumerate(["pos", "neg", "pos"])]
    assert infer_labels(rows, cfg, "value") == ("neg", "pos")


def test_preset_data_paths_name_the_repos_files_from_any_directory(tmp_path, monkeypatch, caplog):
    """configs/ presets name committed files (examples/data/...): they resolve against the
    repository, not the current directory, and the log says so. The user's own YAML and
    key=value overrides stay relative to the current directory."""
    import logging
    from pathlib import Path
    repo = Path(config.__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "data").mkdir(parents=True)
    (tmp_path / "examples" / "data" / "reviews_unlabelled.txt").write_text("a decoy\n")
    with caplog.at_level(logging.INFO, logger="jtl"):
        cfg = config.load("tiny-mlm")
    assert cfg.data.train == str(repo / "examples" / "data" / "reviews_unlabelled.txt")
    assert any("preset tiny-mlm: data.train=examples/data/reviews_unlabelled.txt is the repository's"
               in r.getMessage() for r in caplog.records)
    assert config.load("tiny-mlm", ["data.train=mine.txt"]).data.train == "mine.txt"
    (tmp_path / "mine.yaml").write_text("base: tiny-mlm\ndata:\n  validation: examples/data/reviews_unlabelled.txt\n")
    own = config.load(str(tmp_path / "mine.yaml"))
    assert own.data.validation == "examples/data/reviews_unlabelled.txt"  # the user's file: cwd-relative
    assert own.data.train == cfg.data.train  # inherited from the preset
