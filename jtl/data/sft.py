"""Instruction-tuning (SFT) data: prompt/response or chat rows -> packed CLM rows
whose loss covers only the response (assistant) tokens.

A row is either ``{"prompt": ..., "response": ...}`` (``data.prompt_field`` /
``data.response_field``) or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(``data.messages_field``). With a chat template (the tokenizer's, used for
messages always and for prompt/response unless ``data.chat_template=false``),
the assistant spans come from the template itself: each assistant turn is the
text between the conversation rendered up to it with the generation prompt and
rendered through it. A template that does not reproduce its own prefixes, or
that leaves no assistant text, is an error naming the row (never an all-zero
loss mask). Without a template, prompt and response are joined as they are and
the response plus EOS is trained.

Examples are packed several per row (segment ids; positions restart), exactly as
CLM documents are, so no example attends to another; an example longer than
``data.seq_len`` + 1 tokens is cut at the end (counted in the log).
"""
from __future__ import annotations

import logging

from jtl.data.lm import pack
from jtl.data.sources import DataError, Row

log = logging.getLogger("jtl")


def _text(row: Row, field: str) -> str:
    value = row.data.get(field)
    if not isinstance(value, str):
        have = sorted(row.data)
        raise DataError(f"{row.where}: field {field!r} must be text (row has {have})")
    return value


def _messages(row: Row, field: str) -> list[dict]:
    msgs = row.data.get(field)
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise DataError(f"{row.where}: field {field!r} must be a list of {{'role', 'content'}} messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{row.where}: no assistant message: nothing to train on")
    return msgs


def _render(tok, msgs, where: str, **kw) -> str:
    try:
        return tok.apply_chat_template(msgs, tokenize=False, **kw)
    except Exception as e:  # jinja errors name nothing useful on their own
        raise DataError(f"{where}: the chat template failed on this row: {type(e).__name__}: {e}") from e


def chat_spans(tok, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans of the assistant turns), from the template."""
    full = _render(tok, msgs, where)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tok, msgs[:i], where, add_generation_prompt=True)
        through = _render(tok, msgs[:i + 1], where)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render conversations as prefixes of "
                            f"each other, so the assistant tokens cannot be found from it")
        spans.append((len(before), len(through)))
    if not any(b > a and full[a:b].strip() for a, b in spans):
        raise DataError(f"{where}: the chat template leaves no assistant text: the loss mask would be empty "
                        f"(does the template drop assistant content?)")
    return full, spans


def _uses_template(tok, d) -> bool:
    """prompt/response rows go through the chat template: ``data.chat_template``, else
    whether the tokenizer has one."""
    return d.chat_template if d.chat_template is not None else bool(getattr(tok, "chat_template", None))


def example(tok, row: Row, cfg, eos: int | None) -> tuple[list[int], list[float]]:
    """(token ids, per-token loss weight: 1 where the token is response/assistant text)."""
    d = cfg.data
    use_template = _uses_template(tok, d)
    if d.messages_field in row.data:
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{row.where}: chat messages need a tokenizer with a chat template "
                            f"(tokenizer_config.json chat_template); use {d.prompt_field}/{d.response_field} rows")
        msgs = _messages(row, d.messages_field)
    elif use_template:
        msgs = [{"role": "user", "content": _text(row, d.prompt_field)},
                {"role": "assistant", "content": _text(row, d.response_field)}]
    else:
        prompt, response = _text(row, d.prompt_field), _text(row, d.response_field)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if not r:
            raise DataError(f"{row.where}: empty {d.response_field!r}: the loss mask would be empty")
        return p + r, [0.0] * len(p) + [1.0] * len(r)
    text, spans = chat_spans(tok, msgs, row.where)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = [1.0 if any(a <= s < b for a, b in spans) else 0.0 for s, _ in enc["offset_mapping"]]
    if not any(weights):
        raise DataError(f"{row.where}: no token falls in an assistant turn: the loss mask would be empty")
    return list(enc["input_ids"]), weights


def build_sft_rows(rows: list[Row], tok, cfg) -> dict:
    """Packed CLM arrays (``input_ids``, ``targets``, ``loss_weights``, ``segment_ids``,
    ``positions``) where ``loss_weights`` is 1 only on response tokens."""
    from jtl.data.tokenizer import special_ids
    sp = special_ids(tok)
    seq, limit = cfg.data.seq_len, cfg.model.vocab_size
    pieces, cut, dropped = [], 0, 0
    for row in rows:
        ids, w = example(tok, row, cfg, sp["eos"])
        if max(ids) >= limit:
            raise DataError(f"{row.where}: token id {max(ids)} >= model.vocab_size={limit}; the tokenizer "
                            f"({len(tok)} tokens) does not match the model")
        if len(ids) > seq + 1:
            ids, w, cut = ids[:seq + 1], w[:seq + 1], cut + 1
        if len(ids) < 2 or not any(w[1:]):  # the weight of a token is on the step predicting it
            dropped += 1
            continue
        pieces.append((ids, w[1:]))
    if cut or dropped:
        log.warning("sft: %d of %d examples longer than data.seq_len=%d + 1 tokens were cut at the end; "
                    "%d had no response token left and were dropped", cut, len(rows), seq, dropped)
    if not pieces:
        raise DataError("sft: no example with a response token to train on")
    out = pack(pieces, seq, "clm", sp["pad"] if sp["pad"] is not None else 0, set(), cfg.data.pack)
    log.info("sft: %d examples in %d rows of %d tokens; %.1f%% of the tokens are trained (responses)",
             len(pieces), len(out["input_ids"]), seq,
             100 * out["loss_weights"].sum() / max((out["segment_ids"] > 0).sum(), 1))
    return out


def sft_texts(rows: list[Row], cfg) -> list[str]:
    """The text of the rows, for training a tokenizer when none is given."""
    d, out = cfg.data, []
    for row in rows:
        if d.messages_field in row.data:
            out += [m["content"] for m in _messages(row, d.messages_field)]
        else:
            out += [_text(row, d.prompt_field), _text(row, d.response_field)]
    return out


def generation_prompt(tok, row: Row, cfg) -> tuple[list[int], str]:
    """(prompt token ids, reference) for evaluation by generation: the tokens the model
    reads before the row's last response in training, and that response's text."""
    d = cfg.data
    use_template = _uses_template(tok, d)
    if d.messages_field in row.data:
        msgs = _messages(row, d.messages_field)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs, reference = msgs[:last], msgs[last]["content"]
    elif use_template:
        msgs, reference = [{"role": "user", "content": _text(row, d.prompt_field)}], _text(row, d.response_field)
    else:
        msgs, reference = None, _text(row, d.response_field)
    text = _text(row, d.prompt_field) if msgs is None else _render(tok, msgs, row.where, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{row.where}: empty prompt: nothing to generate a response from "
                        f"(task.generate_metric)")
    return ids, reference
