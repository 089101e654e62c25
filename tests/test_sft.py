"""Instruction tuning (task.kind=sft): response-only loss masks, from the chat template
when there is one; packing changes nothing; an empty mask is an error."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl import config as C
from jtl import sharding as S
from jtl.data.sft import build_sft_rows, example, generation_prompt
from jtl.data.sources import DataError, Row
from jtl.data.tokenizer import special_ids, train_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["what is two plus two", "four", "name a colour", "blue", "translate cat", "chat",
         "the film was long and dull", "negative", "a warm and funny story", "positive"] * 3
PAIRS = [{"prompt": f"Review: {TEXTS[i]}\nSentiment:", "response": f" {TEXTS[i + 1]}"} for i in range(0, 10, 2)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS + ["<|im_start|>user assistant system<|im_end|>"], 300, kind="bpe")


def cfg(**over):
    base = {"task.kind": "sft", "model.family": "llama", "model.vocab_size": 320, "model.hidden": 32,
            "model.layers": 2, "model.heads": 4, "model.kv_heads": 2, "model.mlp": 64, "model.max_len": 128,
            "model.dropout": 0.0, "model.attention_dropout": 0.0, "data.seq_len": 96,
            "train.batch_size": 4, "mesh.data": 1}
    return C.Config().replace(**{**base, **over})


def rows(items):
    return [Row(r, f"sft.jsonl:{i + 1}") for i, r in enumerate(items)]


def test_prompt_response_trains_only_the_response_and_eos(tok):
    c = cfg(**{"data.chat_template": False})
    eos = special_ids(tok)["eos"]
    for r in rows(PAIRS):
        ids, w = example(tok, r, c, eos)
        response = tok(r.data["response"], add_special_tokens=False)["input_ids"] + [eos]
        assert [i for i, x in zip(ids, w) if x] == response
        assert ids[:len(ids) - len(response)] == tok(r.data["prompt"], add_special_tokens=False)["input_ids"]
    arrays = build_sft_rows(rows(PAIRS), tok, c)
    trained = arrays["targets"][arrays["loss_weights"] > 0]  # the weight sits on the step predicting it
    expect = [t for p in PAIRS for t in tok(p["response"], add_special_tokens=False)["input_ids"] + [eos]]
    assert sorted(trained.tolist()) == sorted(expect)
    assert not arrays["loss_weights"][arrays["segment_ids"] == 0].any()


def test_chat_messages_train_every_assistant_turn_from_the_template(tok):
    tok.chat_template = CHATML
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"},
                {"role": "assistant", "content": "blue"}, {"role": "user", "content": "translate cat"},
                {"role": "assistant", "content": "chat"}]
        ids, w = example(tok, Row({"messages": msgs}, "chat.jsonl:1"), cfg(), None)
        assert tok.decode([i for i, x in zip(ids, w) if x]) == "blue<|im_end|>\nchat<|im_end|>\n"
        # evaluation by generation completes the conversation before its last assistant turn
        ids, reference = generation_prompt(tok, Row({"messages": msgs}, "chat.jsonl:1"), cfg())
        assert reference == "chat" and tok.decode(ids) == (
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nname a colour<|im_end|>\n<|im_start|>"
            "assistant\nblue<|im_end|>\n<|im_start|>user\ntranslate cat<|im_end|>\n<|im_start|>assistant\n")
        # prompt/response rows go through the same template (data.chat_template=null: it has one)
        ids, w = example(tok, rows(PAIRS)[0], cfg(), None)
        assert tok.decode([i for i, x in zip(ids, w) if x]) == PAIRS[0]["response"] + "<|im_end|>\n"
        # A template that drops the assistant's text would give an all-zero mask: refused.
        tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        with pytest.raises(DataError, match=r"chat\.jsonl:1: the chat template leaves no assistant text"):
            example(tok, Row({"messages": msgs}, "chat.jsonl:1"), cfg(), None)
    finally:
        tok.chat_template = None
    with pytest.raises(DataError, match=r"x\.jsonl:2: no assistant message"):
        tok.chat_template = CHATML
        try:
            example(tok, Row({"messages": msgs[:2]}, "x.jsonl:2"), cfg(), None)
        finally:
            tok.chat_template = None
    with pytest.raises(DataError, match=r"y\.jsonl:3: empty 'response'"):
        example(tok, Row({"prompt": "hi", "response": ""}, "y.jsonl:3"), cfg(**{"data.chat_template": False}), None)


def test_packed_rows_give_the_same_loss_as_one_example_per_row(tok):
    from jtl.pretrain import evaluate_lm
    from jtl.tasks import TaskSpec
    from jtl.train import build
    c = cfg(**{"data.chat_template": False})
    packed = build_sft_rows(rows(PAIRS), tok, c)
    single = build_sft_rows(rows(PAIRS), tok, c.replace(**{"data.pack": False}))
    assert len(packed["input_ids"]) < len(single["input_ids"]) == len(PAIRS)
    setup = build(c, TaskSpec(), S.make_mesh((1, 1, 1), jax.devices()[:1]), total_steps=10)
    a, b = evaluate_lm(setup, packed, 4), evaluate_lm(setup, single, 4)
    assert a["tokens"] == b["tokens"] == single["loss_weights"].sum()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_sft_run_learns_the_responses(tmp_path, tok):
    from jtl.pretrain import pretrain
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 8))
    tok.save_pretrained(str(tmp_path / "tok"))
    val = tmp_path / "val.jsonl"  # the prompts the validation completes (task.generate_metric)
    val.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    c = cfg(**{"data.train": str(data), "data.validation": str(val), "data.tokenizer": str(tmp_path / "tok"),
               "data.chat_template": False, "train.steps": 60, "optim.lr": 1e-2, "optim.warmup_steps": 0,
               "train.progress": False, "train.eval_every": 30, "train.log_every": 5, "run_dir": str(tmp_path / "run"),
               "task.generate_metric": "exact_match", "task.generate_tokens": 4, "train.eval_batch_size": 2})
    summary = pretrain(c)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if x["split"] == "train"]
    assert train[-1] < 0.5 * train[0], train
    assert summary["validation_loss"] < 0.5 * train[0], summary
    # evaluation by generation: logged beside the loss at each validation, and in the summary
    evals = [x for x in lines if x["split"] == "validation"]
    assert [x["step"] for x in evals] == [30, 60] and all("exact_match" in x and "loss" in x for x in evals)
    # by hand: greedy completions of the last step's weights (jtl generate RUN_DIR), compared as text
    from jtl.generate import load
    gen = load(tmp_path / "run")
    done = gen.generate([tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in PAIRS], max_new_tokens=4)
    hand = sum(d.text.strip() == p["response"].strip() for d, p in zip(done, PAIRS)) / len(PAIRS)
    assert summary["validation_exact_match"] == evals[-1]["exact_match"] == pytest.approx(hand)
    assert hand > 0, [d.text for d in done]


def test_generation_eval_completes_the_prompts_with_the_current_parameters(tok):
    """task.generate_metric on hand-made references: two rows' references are what the
    (random) model completes, so exact match is 2/5; new parameters give new completions."""
    from jtl.generate import from_setup
    from jtl.pretrain import generation_eval
    from jtl.tasks import TaskSpec
    from jtl.train import build
    c = cfg(**{"data.chat_template": False, "model.init_std": 0.3, "data.validation": "val.jsonl",
               "task.generate_metric": "exact_match", "task.generate_tokens": 3})
    setup = build(c, TaskSpec(), S.make_mesh((1, 1, 1), jax.devices()[:1]), total_steps=10)
    prompts = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in PAIRS]

    def completions():  # a fresh Generator on the current parameters
        return [d.text for d in from_setup(setup, tok).generate(prompts, max_new_tokens=3)]
    texts = completions()
    refs = texts[:2] + ["not " + t for t in texts[2:]]
    val = rows([{"prompt": p["prompt"], "response": r} for p, r in zip(PAIRS, refs)])
    run = generation_eval(setup, tok, val, c, batch_size=2)
    assert run() == {"exact_match": 2 / 5}
    setup.state = jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, setup.state)
    new = completions()
    assert new != texts
    assert run() == {"exact_match": pytest.approx(sum(a.strip() == b.strip() for a, b in zip(new, refs)) / 5)}


def test_generation_metrics_by_hand():
    from jtl.evaluation import generation_score
    refs = [" positive", "negative", "blue", "Paris is the capital"]
    outs = [" positive ", "positive", "Blue.", "paris, of course"]
    assert generation_score("exact_match", outs, refs) == 0.25  # only the first (whitespace ignored)
    assert generation_score("label_accuracy", outs, refs) == 0.75  # first words: case, punctuation ignored
    assert generation_score("bleu", ["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # 1-4-gram precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty
    assert generation_score("bleu", ["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-3)


def test_generate_metric_keys_are_validated(tmp_path):
    with pytest.raises(C.ConfigError, match=r"task\.generate_metric: 'rouge' is not one of 'exact_match', "
                                            r"'label_accuracy', 'bleu'"):
        C.load(None, ["task.kind=sft", "data.validation=v.jsonl", "task.generate_metric=rouge"])
    with pytest.raises(C.ConfigError, match=r"task\.generate_metric='bleu' is for task\.kind=sft"):
        C.load(None, ["task.kind=clm", "data.validation=v.jsonl", "task.generate_metric=bleu"])
    with pytest.raises(C.ConfigError, match=r"task\.generate_metric='bleu' needs data\.validation"):
        C.load(None, ["task.kind=sft", "task.generate_metric=bleu"])
    with pytest.raises(C.ConfigError, match=r"task\.generate_tokens must be >= 1, got 0"):
        C.load(None, ["task.kind=sft", "task.generate_tokens=0"])
    # the generation metric may select the best step
    from jtl.tasks import get
    c = C.load(None, ["task.kind=sft", "data.validation=v.jsonl", "task.generate_metric=bleu", "task.metric=bleu"])
    assert get("sft").metric(c) == "bleu" and get("sft").metric_mode(c, "bleu") == "max"
