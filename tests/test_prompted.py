"""Prompted evaluation of a decoder (jtl eval-prompted): label-word log-likelihoods match
the training code's own loss, do not depend on the batch size, and pick the answer."""
import json

import jax
import numpy as np
import pytest

from jtl import config as C
from jtl import sharding as S
from jtl.data.tokenizer import train_tokenizer
from jtl.tasks import TaskSpec
from jtl.train import build

TEXTS = ["a warm and funny story", "the film was long and dull", "great acting", "boring plot",
         "I loved it", "I hated it", "positive", "negative", "Review:", "Sentiment:"]


@pytest.fixture(scope="module")
def model():
    from jtl.generate import from_setup
    tok = train_tokenizer(TEXTS * 3, 300, kind="bpe")
    cfg = C.Config().replace(**{"task.kind": "clm", "model.family": "llama", "model.vocab_size": 320,
                                "model.hidden": 32, "model.layers": 2, "model.heads": 4, "model.kv_heads": 2,
                                "model.mlp": 64, "model.max_len": 128, "model.dropout": 0.0,
                                "model.attention_dropout": 0.0, "data.seq_len": 128, "train.batch_size": 1,
                                "mesh.data": 1})
    setup = build(cfg, TaskSpec(), S.make_mesh((1, 1, 1), jax.devices()[:1]), total_steps=10)
    return setup, from_setup(setup, tok), tok


def reference_score(setup, ctx, cont):
    """-(the CLM eval step's loss sum) with weights on the continuation's targets only."""
    seq = setup.cfg.data.seq_len
    ids = ctx + cont
    row = {"input_ids": np.zeros((1, seq), np.int32), "targets": np.zeros((1, seq), np.int32),
           "loss_weights": np.zeros((1, seq), np.float32), "segment_ids": np.zeros((1, seq), np.int32),
           "positions": np.zeros((1, seq), np.int32)}
    n = len(ids) - 1
    row["input_ids"][0, :n], row["targets"][0, :n] = ids[:-1], ids[1:]
    row["loss_weights"][0, len(ctx) - 1:n] = 1.0
    row["segment_ids"][0, :n], row["positions"][0, :n] = 1, np.arange(n)
    out = setup.eval_step(setup.state, S.global_batch(setup.mesh, row))
    return -float(out["loss_sum"])


def test_scores_equal_the_training_loss_and_ignore_the_batch_size(model):
    from jtl.prompted import Scorer
    setup, gen, tok = model
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    pairs = [(enc(c), enc(w)) for c in ("Review: great acting\nSentiment:", "boring plot", "I hated it and")
             for w in (" positive", " negative")]
    got1, got4 = Scorer(gen)(pairs, batch_size=1), Scorer(gen)(pairs, batch_size=4)
    np.testing.assert_allclose(got1, got4, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got1, [reference_score(setup, c, w) for c, w in pairs], rtol=1e-5, atol=1e-5)


def test_prompted_eval_picks_the_best_label_word_and_reports_the_majority_rate(model, tmp_path):
    from jtl.prompted import evaluate
    setup, gen, tok = model
    train = [{"text": t, "label": lab} for t, lab in [("great acting", "pos"), ("boring plot", "neg"),
                                                     ("I loved it", "pos"), ("I hated it", "neg")]]
    val = [{"text": t, "label": lab} for t, lab in [("a warm and funny story", "pos"),
                                                   ("the film was long and dull", "neg"), ("I loved it", "pos")]]
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = C.Config().replace(**{"data.train": str(tmp_path / "train.jsonl"),
                                "data.validation": str(tmp_path / "val.jsonl"), "data.labels": ("neg", "pos")})
    template = "Review: {text}\nSentiment:"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    for shots in (0, 2):
        r = evaluate(gen, cfg, shots=shots, template=template, label_words=["negative", "positive"], seed=3)
        demo = ""
        if shots:
            pick = np.random.default_rng(3).choice(len(train), size=shots, replace=False)
            demo = "".join(f"Review: {train[i]['text']}\nSentiment: "
                           f"{'positive' if train[i]['label'] == 'pos' else 'negative'}\n\n" for i in pick)
        hand = [[reference_score(setup, enc(demo + template.format(text=v["text"])), enc(" " + w))
                 for w in ("negative", "positive")] for v in val]
        np.testing.assert_allclose(r["scores"], hand, rtol=1e-5, atol=1e-5)
        pred = ["neg", "pos"]
        want = [pred[int(np.argmax(h))] for h in hand]
        assert r["accuracy"] == pytest.approx(np.mean([w == v["label"] for w, v in zip(want, val)]))
        assert r["predicted"] == {k: want.count(k) for k in set(want)}
        assert r["majority_rate"] == pytest.approx(max(want.count(k) for k in set(want)) / len(val))
        assert r["gold"] == {"pos": 2, "neg": 1}
