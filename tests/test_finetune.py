"""Fine-tuning end to end on tiny synthetic tasks (random-init model, hidden 32).

Each head must learn a task that a 2-layer model can solve in ~100 steps (a label
that depends on whether a marker word is present), reach near-perfect validation
scores, and its run directory must then work with ``jtl eval`` / ``jtl predict``.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jtl import config as C
from jtl.data.sources import DataError

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "paper", "light", "horse",
         "bread", "chair", "glass", "dream", "field", "ocean"]
TINY = ["model.family=bert", "model.vocab_size=128", "model.hidden=32", "model.layers=2",
        "model.heads=4", "model.mlp=64", "model.max_len=64", "model.dropout=0.0",
        "model.attention_dropout=0.0", "data.tokenizer_vocab=128", "data.seq_len=32",
        "optim.lr=3e-3", "optim.warmup_ratio=0.05", "train.batch_size=16", "train.progress=false",
        "train.log_every=50", "checkpoint.async_save=false",
        # One device: these tests are about the heads, losses and run files; sharded
        # fine-tuning is tested on 8 devices below and in test_multihost.py.
        "mesh.data=1"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentence(rng, n_min=3, n_max=10, exclude=()):
    words = [w for w in WORDS if w not in exclude]
    return " ".join(rng.choice(words) for _ in range(rng.randint(n_min, n_max)))


def cls_rows(n, seed, marker="magic"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = sentence(rng).split()
        y = i % 2
        if y:
            s.insert(rng.randrange(len(s) + 1), marker)
        out.append({"text": " ".join(s), "label": ["neg", "pos"][y], "idx": i})
    return out


def run(tmp_path, name, extra, train_rows, val_rows, test_rows=None):
    d = tmp_path / name
    d.mkdir()
    keys = [f"data.train={write_jsonl(d / 'train.jsonl', train_rows)}",
            f"data.validation={write_jsonl(d / 'val.jsonl', val_rows)}", f"run_dir={d / 'run'}"]
    if test_rows is not None:
        keys.append(f"data.test={write_jsonl(d / 'test.jsonl', test_rows)}")
    cfg = C.load(None, TINY + keys + extra)
    from jtl.finetune import finetune
    return cfg, finetune(cfg)


def test_classification_trains_and_cli_roundtrip(tmp_path):
    from jtl import cli
    cfg, summary = run(tmp_path, "cls", ["task.kind=classification", "train.steps=120",
                                         "train.eval_every=60", "task.pooling=cls"],
                       cls_rows(400, 0), cls_rows(37, 1))
    val = summary["final"]["validation"]
    assert val["accuracy"] >= 0.97, summary
    assert val["n"] == 37
    run_dir = cfg.out_dir
    for f in ("config.yaml", "summary.json", "tokenizer/tokenizer.json", "metrics.jsonl"):
        assert (run_dir / f).exists(), f
    # The run directory alone is enough: eval and predict through the CLI.
    assert cli.main(["-q", "eval", str(run_dir), "train.eval_batch_size=8"]) == 0
    rows = cls_rows(21, 7)
    for r in rows:
        r.pop("label")
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(run_dir), "--input", inp, "--output", str(out)]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["row"] for p in preds] == list(range(21))
    assert [p["idx"] for p in preds] == [r["idx"] for r in rows]
    want = ["neg", "pos"] * 11
    assert sum(p["label"] == w for p, w in zip(preds, want)) >= 20
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4
    # A failed predict (a row without the text field) leaves the previous output intact.
    before = out.read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"idx": 99}])
    from jtl.finetune import predict_file
    with pytest.raises(DataError, match=r"bad\.jsonl:4"):
        predict_file(run_dir, bad, out)
    assert out.read_bytes() == before and not list(tmp_path.glob(".out.jsonl.tmp*"))
    with pytest.raises(C.ConfigError, match="is the input file"):
        predict_file(run_dir, inp, inp)


def test_eval_counts_every_example_once_on_8_devices(tmp_path):
    import jax
    assert jax.device_count() == 8
    from jtl.finetune import evaluate_run
    cfg, summary = run(tmp_path, "count", ["task.kind=classification", "train.steps=1",
                                           "train.eval_batch_size=8", "data.buckets=[32]",
                                           "mesh.data=-1"], cls_rows(64, 0), cls_rows(37, 1))
    ev = evaluate_run(str(cfg.out_dir), None, [], split="validation")
    assert ev["n"] == 37
    # accuracy is a multiple of 1/37 (each example counted once, padding rows never)
    assert abs(ev["accuracy"] * 37 - round(ev["accuracy"] * 37)) < 1e-6
    assert ev["accuracy"] == pytest.approx(summary["final"]["validation"]["accuracy"])


def pair_rows(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = sentence(rng, 3, 6)
        same = i % 2
        b = a if same else sentence(rng, 3, 6)
        out.append({"s1": a, "s2": b, "label": same})
    return out


def test_pair_classification_uses_token_types(tmp_path):
    # label = whether the marker sits in the SECOND text: needs the pair encoding.
    rng = random.Random(3)

    def rows(n):
        out = []
        for i in range(n):
            a, b = sentence(rng, 2, 5), sentence(rng, 2, 5)
            where = i % 2
            if where:
                b += " magic"
            else:
                a += " magic"
            out.append({"s1": a, "s2": b, "label": where})
        return out
    _, summary = run(tmp_path, "pair", ["task.kind=classification", "data.text_field=s1",
                                        "data.text_pair_field=s2", "train.steps=150", "data.buckets=[32]",
                                        "task.metric=f1"], rows(400), rows(48))
    assert summary["final"]["validation"]["accuracy"] >= 0.95, summary
    assert "f1" in summary["final"]["validation"] and "mcc" in summary["final"]["validation"]


def test_regression(tmp_path):
    rng = random.Random(4)

    def rows(n):
        out = []
        for _ in range(n):
            k = rng.randint(0, 4)
            s = sentence(rng, 2, 4).split() + ["magic"] * k
            rng.shuffle(s)
            out.append({"text": " ".join(s), "label": float(k)})
        return out
    _, summary = run(tmp_path, "reg", ["task.kind=regression", "task.pooling=mean",
                                       "train.steps=200", "data.buckets=[32]"], rows(400), rows(40))
    assert summary["final"]["validation"]["pearson"] >= 0.95, summary


def test_multilabel(tmp_path):
    rng = random.Random(5)

    def rows(n):
        out = []
        for i in range(n):
            s, labels = sentence(rng, 2, 5).split(), []
            for m, name in (("magic", "a"), ("zebra", "b")):
                if rng.random() < 0.5:
                    s.insert(rng.randrange(len(s) + 1), m)
                    labels.append(name)
            out.append({"text": " ".join(s), "label": labels})
        return out
    _, summary = run(tmp_path, "ml", ["task.kind=multilabel", "train.steps=200", "task.pooling=mean",
                                      "data.buckets=[32]", "data.labels=a,b"], rows(400), rows(40))
    assert summary["final"]["validation"]["micro_f1"] >= 0.95, summary


def ner_rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = sentence(rng, 3, 8).split()
        tags = ["O"] * len(words)
        for _ in range(rng.randint(0, 2)):
            i = rng.randrange(len(words))
            if rng.random() < 0.5 and i + 1 < len(words):
                words[i:i + 2], tags[i:i + 2] = ["Mr", "Smith"], ["B-PER", "I-PER"]
            else:
                words[i], tags[i] = "Paris", "B-LOC"
        out.append({"tokens": words, "ner_tags": tags})
    return out


def test_token_classification_with_int_tags(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    tr, va = ner_rows(300, 0), ner_rows(40, 1)
    for r in tr + va:  # int-coded tags (as HF conll2003) mapped through data.labels
        r["ner_tags"] = [names.index(t) for t in r["ner_tags"]]
    cfg, summary = run(tmp_path, "ner", ["task.kind=token_classification", "data.text_field=tokens",
                                         "data.label_field=ner_tags", f"data.labels={','.join(names)}",
                                         "train.steps=150", "data.buckets=[32]"], tr, va)
    assert summary["final"]["validation"]["entity_f1"] >= 0.95, summary
    from jtl.finetune import predict_file
    out = tmp_path / "ner_pred.jsonl"
    rows = ner_rows(5, 9)
    assert predict_file(str(cfg.out_dir), write_jsonl(tmp_path / "ner_in.jsonl", rows), str(out)) == 5
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(p["tags"]) == len(r["tokens"]) for p, r in zip(preds, rows))


def qa_rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = sentence(rng, 4, 12).split()
        i = rng.randrange(len(ctx))
        ctx.insert(i, "magic")
        ctx.insert(i + 1, "zebra")
        text = " ".join(ctx)
        start = text.index("magic zebra") + len("magic ")
        out.append({"question": "which animal ?", "context": text,
                    "answers": {"text": ["zebra"], "answer_start": [start]}})
    return out


def test_qa_long_contexts_use_windows(tmp_path):
    _, summary = run(tmp_path, "qa", ["task.kind=qa", "data.text_field=question",
                                      "data.text_pair_field=context", "data.label_field=answers",
                                      "data.seq_len=16", "data.doc_stride=4", "train.steps=200",
                                      "data.buckets=[16]"],
                     qa_rows(300, 0), qa_rows(40, 1))
    val = summary["final"]["validation"]
    assert summary["truncated"]["train"] > 0  # some contexts needed several windows
    assert val["squad_exact"] >= 90 and val["squad_f1"] >= 90, summary


# ---------------------------------------------------------------- bad data


def _prepare(tmp_path, train_rows, val_rows, extra=()):
    from jtl.finetune import finetune
    d = tmp_path
    cfg = C.load(None, TINY + [f"data.train={write_jsonl(d / 'train.jsonl', train_rows)}",
                               f"data.validation={write_jsonl(d / 'val.jsonl', val_rows)}",
                               f"run_dir={d / 'run'}", "task.kind=classification",
                               "train.steps=1"] + list(extra))
    return lambda: finetune(cfg)


def test_bad_data_errors_name_file_and_row(tmp_path):
    good = cls_rows(40, 0)
    bad = cls_rows(5, 1)
    bad[3]["label"] = "maybe"
    with pytest.raises(DataError, match=r"val.jsonl:4: unknown label 'maybe'"):
        _prepare(tmp_path, good, bad)()
    bad = cls_rows(5, 1)
    del bad[2]["text"]
    with pytest.raises(DataError, match=r"val.jsonl:3: missing field 'text'"):
        _prepare(tmp_path, good, bad)()
    bad = cls_rows(5, 1)
    bad[1]["text"] = "  "
    with pytest.raises(DataError, match=r"val.jsonl:2: field 'text' is empty"):
        _prepare(tmp_path, good, bad)()
    from jtl.finetune import finetune
    cfg = C.load(None, TINY + [f"data.train={write_jsonl(tmp_path / 'train.jsonl', good)}",
                               f"data.validation={tmp_path / 'broken.jsonl'}", "task.kind=classification"])
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "pos"}\nnot json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        finetune(cfg)
    with pytest.raises(C.ConfigError, match=r"task.metric='pearson' is not computed"):
        _prepare(tmp_path, good, cls_rows(5, 1), ["task.metric=pearson"])()


def test_overlong_inputs_are_truncated_and_counted(tmp_path):
    from jtl.finetune import encode_split, prepare
    rows = cls_rows(40, 0)
    rows[0]["text"] = " ".join(["apple"] * 100)
    cfg = C.load(None, TINY + [f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
                               "task.kind=classification", f"run_dir={tmp_path / 'run'}"])
    cfg, tok, data = prepare(cfg)
    enc = encode_split(cfg, data["train"], tok)
    assert enc.truncated == 1
    assert enc.lengths.max() == cfg.data.seq_len
    assert enc.arrays["input_ids"][0, -1] == tok.sep_token_id  # still ends with [SEP]


def test_bucketed_batches_cover_each_row_once_per_epoch():
    from jtl.data.tasks import epoch_plan
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 128, size=1001)
    buckets = (16, 32, 64, 128)
    plan = epoch_plan(lengths, buckets, 32, seed=1)
    seen = np.concatenate([i for i, _ in plan])
    assert sorted(seen.tolist()) == list(range(1001))
    assert all(lengths[i].max() <= w for i, w in plan)
    assert {w for _, w in plan} <= set(buckets)
    again = epoch_plan(lengths, buckets, 32, seed=1)
    assert all((a == b).all() and wa == wb for (a, wa), (b, wb) in zip(plan, again))
    other = epoch_plan(lengths, buckets, 32, seed=2)
    assert any(len(a) != len(b) or (a != b).any() for (a, _), (b, _) in zip(plan, other))


def test_label_map_names_and_indices():
    from jtl.data.tasks import LabelMap
    tags = LabelMap(("O", "B-PER", "I-PER"), "ner_tags")
    assert [tags(v, "f:1") for v in ("O", "I-PER", 1)] == [0, 2, 1]  # ints index name lists
    nums = LabelMap(("0", "1", "5"), "label")
    assert nums(5, "f:1") == 2
    with pytest.raises(DataError, match=r"f:2: unknown label 2 in field 'label'"):
        nums(2, "f:2")  # never read as an index when labels are numbers themselves


def test_preempted_finetune_resumes_exactly_with_its_best_so_far(tmp_path):
    """Stop at step 25 (between evaluations, as SIGTERM would), rerun: the resumed run
    keeps the evaluation history and best step of the first part, and ends with the same
    history, best step and final metrics as an uninterrupted run (dropout on: its RNG
    follows the restored step counter; the batch order is a function of the step)."""
    from jtl import preemption
    from jtl.finetune import finetune
    extra = ["task.kind=classification", "train.steps=40", "train.eval_every=10", "model.dropout=0.1",
             "checkpoint.keep=1"]
    first_cfg, _ = run(tmp_path, "data", extra, cls_rows(200, 0), cls_rows(30, 1))  # files + tokenizer
    d = tmp_path / "data"
    base = TINY + extra + [f"data.train={d / 'train.jsonl'}", f"data.validation={d / 'val.jsonl'}",
                           f"data.tokenizer={first_cfg.out_dir / 'tokenizer'}"]
    ref = finetune(C.load(None, base + [f"run_dir={tmp_path / 'ref'}"]))
    cut = C.load(None, base + [f"run_dir={tmp_path / 'cut'}"])

    def stop_at_25(step, guard):
        if step == 25:
            guard.request()
    with pytest.raises(preemption.Preempted) as e:
        finetune(cut, on_step=stop_at_25)
    assert e.value.step == 25
    resumed = finetune(cut)
    strip = lambda hist: [{k: v for k, v in h.items() if k != "eval_s"} for h in hist]  # noqa: E731
    assert len(resumed["history"]) == 4
    assert strip(resumed["history"]) == strip(ref["history"])
    assert resumed["best_step"] == ref["best_step"] and resumed["best_metric"] == ref["best_metric"]


def test_equal_token_weighting_does_not_depend_on_batch_grouping():
    """Length buckets put short rows together. With task.token_weighting="equal" a batch's
    loss is sum / (rows x mean labelled tokens per row), so two bucketed half-batches
    weigh every token exactly as the mixed batch does; "batch" (mean over the batch's own
    tokens) gives the tokens of the short half more weight."""
    import jax.numpy as jnp
    from jtl.tasks import TaskSpec, loss_and_outputs
    from jtl.train import create_model
    cfg = C.load(None, TINY + ["task.kind=token_classification", "data.labels=O,B,I"])
    rng = np.random.default_rng(0)
    rows, width = 8, 16
    lengths = np.array([3, 4, 3, 5, 14, 15, 13, 16])  # 4 short rows, 4 long rows
    seg = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    batch = {"input_ids": rng.integers(5, 128, (rows, width)).astype(np.int32) * seg,
             "segment_ids": seg, "positions": np.tile(np.arange(width, dtype=np.int32), (rows, 1)) * seg,
             "labels": np.where(seg > 0, rng.integers(0, 3, (rows, width)), -100).astype(np.int32),
             "example_weights": np.ones(rows, np.float32)}
    half = lambda b, s: {k: v[s] for k, v in b.items()}  # noqa: E731
    per_row = float(lengths.mean())

    def loss(spec, b):
        import jax
        from jtl import sharding as S
        with S.activate(S.make_mesh((1, 1, 1), jax.devices()[:1])):
            model = create_model(cfg, spec)
            ls, count, _ = loss_and_outputs(cfg, spec, model, {k: jnp.asarray(v) for k, v in b.items()}, None)
        return float(ls / count)

    equal, plain = TaskSpec(num_labels=3, label_tokens_per_row=per_row), TaskSpec(num_labels=3)
    whole = loss(equal, batch)
    split = loss(equal, half(batch, slice(0, 4))) + loss(equal, half(batch, slice(4, 8)))
    assert split / 2 == pytest.approx(whole, rel=1e-5)
    assert loss(plain, batch) == pytest.approx(whole, rel=1e-5)  # same on the mixed batch
    split_plain = loss(plain, half(batch, slice(0, 4))) + loss(plain, half(batch, slice(4, 8)))
    assert abs(split_plain / 2 - whole) > 1e-3  # the short half is upweighted
