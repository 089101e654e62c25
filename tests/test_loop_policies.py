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


def test_mfu_counts_each_bucketed_batch_at_its_own_width(tmp_path):
    """MFU over a window = the FLOPs of the batches in it / its time. Counting every step at
    the epoch's mean width let windows of short buckets exceed 100%; now each step counts
    its own width. Read back from metrics.jsonl (no timing: mfu x peak x time = FLOPs)."""
    import json

    from jtl.metrics import measure_cpu_peak, train_flops_per_step
    from test_finetune import ner_rows, run
    rows = ner_rows(200, 0) + [{"tokens": r["tokens"] * 3, "ner_tags": r["ner_tags"] * 3}
                               for r in ner_rows(100, 2)]  # two bucket widths
    cfg, _ = run(tmp_path, "ner", ["task.kind=token_classification", "data.text_field=tokens",
                                   "data.label_field=ner_tags", "data.labels=O,B-PER,I-PER,B-LOC,I-LOC",
                                   "train.steps=12", "train.log_every=1", "data.buckets=[16,32]"],
                 rows, ner_rows(20, 1))
    import jax
    from jtl.sharding import mesh_shape
    assert mesh_shape(cfg.mesh, jax.device_count()) == (1, 1, 1) and jax.device_count() == 8
    peak = measure_cpu_peak()  # 1 of 8 simulated devices: it still has all the host's cores
    B = cfg.train.batch_size
    widths = set()
    for line in (cfg.out_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] != "train":
            continue
        width = round(r["padded_tokens_per_s"] * r["step_time"] / B)
        widths.add(width)
        counted = r["mfu"] * peak * r["step_time"]
        assert counted == pytest.approx(train_flops_per_step(cfg.model, B, width, cfg.task.kind), rel=1e-6)
        assert 0 < r["mfu"] <= 1.0, r
    assert widths == {16, 32}


@pytest.mark.parametrize("kind", ["mlm", "clm", "classification", "token_classification", "regression",
                                  "multilabel", "qa"])
def test_counted_flops_never_exceed_the_compiled_steps_flops(kind):
    """MFU <= 1 needs the FLOPs we count for a step to be at most what its program runs
    (XLA's cost analysis of the compiled train step), at every bucket width."""
    import jax
    import numpy as np

    from helpers import tiny_cfg
    from jtl import sharding as S
    from jtl.bench import hlo_flops, synthetic_batch, task_spec
    from jtl.metrics import train_flops_per_step
    from jtl.tasks import TaskSpec
    from jtl.train import build
    cfg = tiny_cfg(kind, **{"model.max_len": 64})
    spec = task_spec(cfg) if kind == "mlm" else TaskSpec(num_labels=3)
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = build(cfg, spec, mesh, 10)
    B = cfg.train.batch_size
    # the sequence/span heads add no counted FLOPs over classification's body: one width
    for width in (16, 32) if kind in ("mlm", "clm", "classification", "token_classification") else (32,):
        lm = cfg.replace(**{"data.seq_len": width, "task.kind": kind if kind in ("mlm", "clm") else "mlm"})
        batch = synthetic_batch(lm)
        if kind not in ("mlm", "clm"):
            batch.pop("mlm_eligible")
            batch["example_weights"] = np.ones((B,), np.float32)
            labels = {"token_classification": np.zeros((B, width), np.int32),
                      "regression": np.zeros((B,), np.float32),
                      "multilabel": np.zeros((B, 3), np.float32)}
            if kind == "qa":
                batch["start_positions"] = batch["end_positions"] = np.zeros((B,), np.int32)
            else:
                batch["labels"] = labels.get(kind, np.zeros((B,), np.int32))
        compiled = setup.train_step.lower(setup.state, S.global_batch(mesh, batch)).compile()
        counted = train_flops_per_step(cfg.model, B, width, kind, spec.max_predictions)
        assert 0 < counted <= hlo_flops(compiled), (kind, width)
