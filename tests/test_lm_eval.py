"""The lm-evaluation-harness model ``jtl`` (jtl.lm_eval_adapter): log-likelihoods equal jtl's
own scoring and a full forward, at any batch size; rolling windows score every token once;
generate_until is jtl's greedy generation cut at ``until``; lm_eval runs a local task offline,
from Python and from ``jtl lm-eval``."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtl import config as C
from jtl import sharding as S
from jtl.data.tokenizer import train_tokenizer
from jtl.tasks import TaskSpec
from jtl.train import build

from lm_eval.api.instance import Instance  # in the test extra: never skipped

from jtl.lm_eval_adapter import JtlLM

TEXTS = ["a warm and funny story", "the film was long and dull", "great acting", "boring plot",
         "I loved it", "I hated it", "positive", "negative", "Review:", "Sentiment:"]
WIDTH = 128  # model.max_len


@pytest.fixture(scope="module")
def model():
    from jtl.generate import from_setup
    tok = train_tokenizer(TEXTS * 3, 300, kind="bpe")
    cfg = C.Config().replace(**{"task.kind": "clm", "model.family": "llama", "model.vocab_size": 320,
                                "model.hidden": 32, "model.layers": 2, "model.heads": 4, "model.kv_heads": 2,
                                "model.mlp": 64, "model.max_len": WIDTH, "model.dropout": 0.0,
                                "model.init_std": 0.3, "model.attention_dropout": 0.0, "data.seq_len": WIDTH,
                                "train.batch_size": 1, "mesh.data": 1})
    setup = build(cfg, TaskSpec(), S.make_mesh((1, 1, 1), jax.devices()[:1]), total_steps=10)
    return from_setup(setup, tok), tok


def log_probs(gen, ids):
    """log p(ids[i+1] | ids[:i+1]) from the training forward (Model.__call__) of one
    right-padded row; and whether each is the argmax."""
    row, seg = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), np.int32)
    row[0, :len(ids)], seg[0, :len(ids)] = ids, 1
    with S.activate(gen.mesh):
        logits = nnx.merge(gen.graphdef, gen.params)(gen.m, {"input_ids": row, "segment_ids": seg})
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1))[0, :len(ids) - 1]
    nxt = np.asarray(ids[1:])
    return logp[np.arange(len(nxt)), nxt], logp.argmax(-1) == nxt


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LL = [("Review: great acting\nSentiment:", " positive"), ("Review: great acting\nSentiment:", " negative"),
      ("boring plot", " and dull"), ("I hated it and ", "boring"),  # the trailing space moves
      ("", "I loved it"), ("a warm and funny story " * 6, "great acting"), ("great", " acting")]


def test_loglikelihoods_equal_jtl_scoring_and_a_full_forward_at_any_batch_size(model):
    from jtl.prompted import Scorer
    gen, tok = model
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    one, three = JtlLM(generator=gen, batch_size=1), JtlLM(generator=gen, batch_size=3)
    got1, got3 = one.loglikelihood(requests("loglikelihood", LL)), three.loglikelihood(requests("loglikelihood", LL))
    assert [g for _, g in got1] == [g for _, g in got3]
    np.testing.assert_allclose([x for x, _ in got1], [x for x, _ in got3], rtol=1e-6, atol=1e-6)
    pairs, hand = [], []
    for ctx, cont in LL:
        if not ctx:  # an empty context is the BOS (here also EOS) token
            c, k = [tok.bos_token_id], enc(cont)
        else:
            ctx, cont = ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")):] + cont
            c = enc(ctx)
            k = enc(ctx + cont)[len(c):]
        pairs.append((c, k))
        lp, top = log_probs(gen, c + k)
        hand.append((float(lp[len(c) - 1:].sum()), bool(top[len(c) - 1:].all())))
    assert len(pairs[5][0]) > 30 and pairs[3][1] == enc(" boring")
    np.testing.assert_allclose([x for x, _ in got1], Scorer(gen)(pairs, 4), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([x for x, _ in got1], [x for x, _ in hand], rtol=1e-5, atol=1e-5)
    assert [g for _, g in got1] == [g for _, g in hand]
    # a context longer than max_length loses its oldest tokens
    short = JtlLM(generator=gen, batch_size=2, max_length=16)
    (lp, _), = short.loglikelihood(requests("loglikelihood", [LL[5]]))
    c, k = pairs[5]
    row = (c + k)[-17:]
    assert lp == pytest.approx(float(log_probs(gen, row)[0][len(row) - len(k) - 1:].sum()), abs=1e-5)


def test_loglikelihood_rolling_scores_every_token_once_over_several_windows(model):
    gen, tok = model
    text = " ".join(TEXTS)
    t = tok(text, add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id] + t
    L = 16
    assert len(t) > 2 * L  # three windows or more
    want = 0.0
    for a in range(0, len(t), L):  # window predicting t[a:b] reads the L tokens before t[b-1]
        b = min(a + L, len(t))
        s = max(0, b - L)
        lp, _ = log_probs(gen, full[s:b + 1])  # row full[s:b+1] predicts t[s:b]
        want += float(lp[a - s:].sum())
    for bs in (1, 3):
        got, = JtlLM(generator=gen, batch_size=bs, max_length=L).loglikelihood_rolling(
            requests("loglikelihood_rolling", [(text,)]))
        assert got == pytest.approx(want, abs=1e-4)
    # one window: the plain sum over the text
    got, = JtlLM(generator=gen, batch_size=2).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(float(log_probs(gen, full)[0].sum()), abs=1e-4)


def test_generate_until_is_greedy_generation_cut_at_until_and_max_gen_toks(model):
    gen, tok = model
    contexts = ["Review: great acting\nSentiment:", "boring", "I loved it and the film was long"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    ref = gen.generate(ids, max_new_tokens=12, eos=[])
    texts = [gen.decode_text(c.tokens) for c in ref]
    assert all(len(x) > 6 for x in texts), texts
    stop = texts[0][3:5]  # a string the first completion contains after its start
    reqs = requests("generate_until", [(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts]
                    + [(contexts[1], {"until": ["\u2603"], "max_gen_toks": 3, "do_sample": False})])
    lm = JtlLM(generator=gen, batch_size=3)
    gen.eos_ids, saved = (), gen.eos_ids  # the random model may say EOS early; compare without it
    try:
        got = lm.generate_until(reqs)
        assert got == JtlLM(generator=gen, batch_size=1).generate_until(reqs)
    finally:
        gen.eos_ids = saved
    assert got[:3] == [x[:x.find(stop)] if stop in x else x for x in texts]
    assert got[0] == texts[0][:texts[0].find(stop)] and len(got[0]) < len(texts[0])
    assert got[3] == gen.decode_text(ref[1].tokens[:3])


def _local_task(tmp_path):
    rows = [{"text": t, "label": int(i % 2)} for i, t in enumerate(TEXTS[:6])]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "jtl_tiny_mc.yaml").write_text(
        "task: jtl_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'val.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: \"Review: {{text}}\\nSentiment:\"\ndoc_to_choice: [\"negative\", \"positive\"]\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return rows


def _hand_accuracy(gen, tok, rows):
    from jtl.prompted import Scorer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    right = 0
    for r in rows:
        ctx = enc(f"Review: {r['text']}\nSentiment:")
        scores = Scorer(gen)([(ctx, enc(" negative")), (ctx, enc(" positive"))], 2)
        right += int(np.argmax(scores) == r["label"])
    return right / len(rows)


def test_lm_eval_runs_a_local_multiple_choice_task_offline(model, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    gen, tok = model
    rows = _local_task(tmp_path)
    want = _hand_accuracy(gen, tok, rows)
    assert get_model("jtl") is JtlLM
    out = lm_eval.simple_evaluate(model=JtlLM(generator=gen, batch_size=4), tasks=["jtl_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                           include_defaults=False))
    assert out["results"]["jtl_tiny_mc"]["acc,none"] == pytest.approx(want)

    # `jtl lm-eval` (= python -m jtl.lm_eval_adapter): lm_eval's command line, model_args to JtlLM
    from jtl import cli
    seen = {}

    def fake_load(source, overrides=()):
        seen.update(source=source, overrides=list(overrides))
        return gen
    monkeypatch.setattr("jtl.generate.load", fake_load)
    rc = cli.main(["lm-eval", "--model_args", "run=some/run,batch_size=3,mesh.tensor=1", "--tasks", "jtl_tiny_mc",
                   "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")])
    assert rc == 0 and seen == {"source": "some/run", "overrides": ["mesh.tensor=1"]}
    result, = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(result.read_text())["results"]["jtl_tiny_mc"]["acc,none"] == pytest.approx(want)


def test_bad_model_args_are_refused_naming_them(model):
    from jtl.config import ConfigError
    gen, _ = model
    with pytest.raises(ConfigError, match=r"model_args pretrained='x': unknown; expected run"):
        JtlLM.create_from_arg_string("pretrained=x", {"batch_size": 1})
    with pytest.raises(ConfigError, match=r"batch_size='auto': expected a number"):
        JtlLM(generator=gen, batch_size="auto")
    with pytest.raises(ConfigError, match="give run=PATH"):
        JtlLM()
