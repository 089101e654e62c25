"""Instruction tuning (task.kind=sft): response-only loss masks, from the chat template
when there is one; packing changes nothing; an empty mask is an error."""
import json

import jax
import numpy as np
import pytest

from jtl import config as C
from jtl import sharding as S
from jtl.data.sft import build_sft_rows, example
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
    c = cfg(**{"data.train": str(data), "data.validation": str(data), "data.tokenizer": str(tmp_path / "tok"),
               "data.chat_template": False, "train.steps": 60, "optim.lr": 1e-2, "optim.warmup_steps": 0,
               "train.progress": False, "train.eval_every": 60, "train.log_every": 5, "run_dir": str(tmp_path / "run")})
    summary = pretrain(c)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if x["split"] == "train"]
    assert train[-1] < 0.5 * train[0], train
    assert summary["validation_loss"] < 0.5 * train[0], summary
