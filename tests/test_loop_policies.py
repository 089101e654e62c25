"""The loop's policies on what the user sees: skipped updates, preemption messages."""
import pytest

from jtl import config as C
from jtl import preemption
from jtl.pretrain import pretrain
from test_checkpoint import make_cfg


def test_nan_skip_warns_each_step_and_stops_after_consecutive_skips(tmp_path, caplog):
    cfg = make_cfg(tmp_path, "optim.lr=1e30", "optim.clip_norm=null", "train.nan_policy=skip",
                   "train.max_consecutive_skips=3", "train.steps=10")
    with caplog.at_level("WARNING", logger="jtl"), \
            pytest.raises(FloatingPointError, match=r"step (\d+): 3 updates in a row skipped as non-finite "
                                                     r"\(train.max_consecutive_skips=3\)") as e:
        pretrain(cfg)
    stopped = int(str(e.value).split()[1].rstrip(":"))
    skips = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skips] == [f"step {s}" for s in range(stopped - 2, stopped + 1)]
    assert stopped < 10


def test_max_consecutive_skips_is_validated():
    with pytest.raises(C.ConfigError, match="train.max_consecutive_skips must be >= 0, got -1"):
        C.load("tiny-mlm", ["train.max_consecutive_skips=-1"])


def test_preemption_message_has_one_prefix(tmp_path, caplog):
    def hook(step, guard):
        if step == 2:
            guard.request()
    with caplog.at_level("WARNING", logger="jtl"), pytest.raises(preemption.Preempted):
        pretrain(make_cfg(tmp_path, "train.steps=6"), on_step=hook)
    said = [r.getMessage() for r in caplog.records if "preempted at step 2" in r.getMessage()]
    assert said and not any(m.startswith("jtl:") for m in said), said  # the log format adds "jtl: "
