"""Labelled rows -> padded arrays for each fine-tuning head, and length-bucketed batches.

Everything is described by the config (``data.*`` field names, ``data.labels``,
``task.kind``). Arrays are stored padded to ``data.seq_len`` together with each
example's real length; batches are cut down to the smallest bucket
(``config.bucket_lengths``) that fits their longest row, so XLA compiles one
program per bucket instead of one per batch shape.

Conventions: ``segment_ids`` = 1 for real tokens, 0 for padding; ``positions``
0..n-1; ``token_type_ids`` 0 for the first text, 1 for the pair; token labels
sit on the first sub-token of each word (-100 elsewhere, ignored by the loss).

Over-long inputs are truncated to ``data.seq_len`` (the pair is cut longest-first;
QA contexts are split into overlapping windows instead) and counted in
``Encoded.truncated``; the run logs the count and writes it to summary.json.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from jtl.config import Config, DataConfig, bucket_lengths
from jtl.data.sources import DataError, Row, get_text

log = logging.getLogger("jtl")
IGNORE = -100
SEQUENCE_KINDS = ("classification", "regression", "multilabel")


@dataclass
class Encoded:
    """Model inputs for one split. ``example_of[i]`` = the row a feature came from
    (QA windows: several features per row; otherwise the identity)."""
    arrays: dict  # name -> [N, seq_len] or [N] numpy
    lengths: np.ndarray  # [N] real tokens per feature
    n_rows: int
    truncated: int = 0
    example_of: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # QA: offsets, contexts, answers; NER: words
    per_token: tuple = ("input_ids", "segment_ids", "positions", "token_type_ids")  # cut to width

    def __len__(self):
        return len(self.lengths)


# ---------------------------------------------------------------- labels


def _label_key(value) -> str:
    return str(value)


def infer_labels(rows: list[Row], cfg: Config) -> tuple[str, ...] | None:
    """The label list: ``data.labels`` if set, else the sorted set of training labels
    (numerically when all are integers), as strings."""
    kind = cfg.task.kind
    if kind in ("regression", "qa"):
        return None
    if cfg.data.labels:
        return tuple(cfg.data.labels)
    field_ = cfg.data.label_field
    seen = set()
    for r in rows:
        v = _get(r, field_)
        if kind in ("multilabel", "token_classification"):
            if not isinstance(v, list):
                raise DataError(f"{r.where}: field {field_!r} must be a list for task.kind={kind!r}, "
                                f"got {type(v).__name__}")
            seen.update(v)
        else:
            seen.add(v)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        return tuple(str(v) for v in sorted(seen))
    return tuple(sorted(_label_key(v) for v in seen))


def _get(row: Row, name: str):
    if name not in row.data:
        raise DataError(f"{row.where}: missing field {name!r} (row has {sorted(row.data)})")
    return row.data[name]


class LabelMap:
    """Label value -> index. A value matches a label by its text first; an integer
    that is not itself a label name is read as an index into the list (so int-coded
    data such as HF's CoNLL ``ner_tags`` works with ``data.labels`` = tag names)."""

    def __init__(self, labels: tuple[str, ...], field_name: str):
        self.labels, self.field = labels, field_name
        self.index = {name: i for i, name in enumerate(labels)}
        # Integer values are read as indices only when no label is itself an integer.
        self.by_index = not any(name.lstrip("-").isdigit() for name in labels)

    def __call__(self, value, where: str) -> int:
        i = self.index.get(_label_key(value))
        if i is None and self.by_index and isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value < len(self.labels):
            i = value
        if i is None:
            shown = ", ".join(self.labels[:20]) + (" ..." if len(self.labels) > 20 else "")
            raise DataError(f"{where}: unknown label {value!r} in field {self.field!r}; known labels: "
                            f"{shown} (set data.labels to the full list)")
        return i


# ---------------------------------------------------------------- encoding


def _words(row: Row, name: str) -> list[str]:
    v = _get(row, name)
    if not isinstance(v, list) or not all(isinstance(w, str) for w in v):
        raise DataError(f"{row.where}: field {name!r} must be a list of words for token "
                        f"classification, got {type(v).__name__}")
    if not v:
        raise DataError(f"{row.where}: field {name!r} is empty")
    return v


def _check_vocab(ids_list, rows, vocab_limit):
    for ids, r in zip(ids_list, rows):
        if ids and max(ids) >= vocab_limit:
            raise DataError(f"{r.where}: token id {max(ids)} >= model.vocab_size={vocab_limit}; "
                            f"the tokenizer does not match the model")


def _pad(seqs: list[list[int]], seq_len: int, pad: int) -> np.ndarray:
    out = np.full((len(seqs), seq_len), pad, np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def _base_arrays(ids, types, seq_len, pad_id):
    lengths = np.array([len(s) for s in ids], np.int32)
    input_ids = _pad(ids, seq_len, pad_id)
    seg = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": input_ids, "segment_ids": seg,
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), input_ids.shape).copy()}
    if types is not None:
        arrays["token_type_ids"] = _pad(types, seq_len, 0)
    return arrays, lengths


def encode(rows: list[Row], cfg: Config, tok, labels: tuple[str, ...] | None, *,
           with_labels: bool = True) -> Encoded:
    """Encode rows for ``cfg.task.kind``; ``with_labels=False`` for prediction input."""
    kind = cfg.task.kind
    if kind in SEQUENCE_KINDS:
        return _encode_sequence(rows, cfg, tok, labels, with_labels)
    if kind == "token_classification":
        return _encode_tokens(rows, cfg, tok, labels, with_labels)
    if kind == "qa":
        return _encode_qa(rows, cfg, tok, with_labels)
    raise DataError(f"task.kind={kind!r} is not a fine-tuning task")


def _tokenize_texts(tok, first, second, seq_len):
    """Tokenize (pairs); returns ids, token types and how many rows were truncated."""
    kw = dict(add_special_tokens=True, return_token_type_ids=True)
    full = tok(first, second, truncation=False, **kw) if second is not None else tok(first, truncation=False, **kw)
    ids, types = list(full["input_ids"]), list(full["token_type_ids"])
    long_rows = [i for i, s in enumerate(ids) if len(s) > seq_len]
    if long_rows:
        a = [first[i] for i in long_rows]
        b = [second[i] for i in long_rows] if second is not None else None
        cut = tok(a, b, truncation=True, max_length=seq_len, **kw) if b is not None else \
            tok(a, truncation=True, max_length=seq_len, **kw)
        for j, i in enumerate(long_rows):
            ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
    return ids, types, len(long_rows)


def _encode_sequence(rows, cfg, tok, labels, with_labels) -> Encoded:
    d, kind = cfg.data, cfg.task.kind
    first = [get_text(r, d.text_field) for r in rows]
    second = [get_text(r, d.text_pair_field) for r in rows] if d.text_pair_field else None
    ids, types, n_trunc = _tokenize_texts(tok, first, second, d.seq_len)
    _check_vocab(ids, rows, cfg.model.vocab_size)
    arrays, lengths = _base_arrays(ids, types if cfg.model.type_vocab > 0 else None, d.seq_len,
                                   tok.pad_token_id or 0)
    n = len(rows)
    if kind == "classification":
        lab = np.zeros(n, np.int32)
        if with_labels:
            lm = LabelMap(labels, d.label_field)
            lab[:] = [lm(_get(r, d.label_field), r.where) for r in rows]
    elif kind == "regression":
        lab = np.zeros(n, np.float32)
        if with_labels:
            for i, r in enumerate(rows):
                v = _get(r, d.label_field)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise DataError(f"{r.where}: field {d.label_field!r} must be a number for "
                                    f"regression, got {v!r}")
                lab[i] = v
    else:  # multilabel: a list of label names per row
        lab = np.zeros((n, len(labels)), np.float32)
        if with_labels:
            lm = LabelMap(labels, d.label_field)
            for i, r in enumerate(rows):
                v = _get(r, d.label_field)
                if not isinstance(v, list):
                    raise DataError(f"{r.where}: field {d.label_field!r} must be a list of labels "
                                    f"for multilabel, got {v!r}")
                for x in v:
                    lab[i, lm(x, r.where)] = 1.0
    arrays["labels"] = lab
    return Encoded(arrays, lengths, n, n_trunc, np.arange(n))


def _encode_tokens(rows, cfg, tok, labels, with_labels) -> Encoded:
    d = cfg.data
    words = [_words(r, d.text_field) for r in rows]
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=d.seq_len,
              return_token_type_ids=False)
    lm = LabelMap(labels, d.label_field)
    ids, lab_seqs, word_index, n_trunc = [], [], [], 0
    for i, r in enumerate(rows):
        s = enc["input_ids"][i]
        wids = enc.word_ids(i)
        tags = None
        if with_labels:
            raw = _get(r, d.label_field)
            if not isinstance(raw, list) or len(raw) != len(words[i]):
                raise DataError(f"{r.where}: field {d.label_field!r} must be a list with one tag per "
                                f"word ({len(words[i])} words), got {raw!r:.80}")
            tags = [lm(t, r.where) for t in raw]
        lab, first_tok, prev = [IGNORE] * len(s), [], None
        for j, w in enumerate(wids):
            if w is not None and w != prev:
                lab[j] = tags[w] if tags is not None else 0
                first_tok.append(j)
            prev = w
        if len(first_tok) < len(words[i]):
            n_trunc += 1
        ids.append(s)
        lab_seqs.append(lab)
        word_index.append(first_tok)
    _check_vocab(ids, rows, cfg.model.vocab_size)
    arrays, lengths = _base_arrays(ids, None, d.seq_len, tok.pad_token_id or 0)
    arrays["labels"] = _pad(lab_seqs, d.seq_len, IGNORE)
    return Encoded(arrays, lengths, len(rows), n_trunc, np.arange(len(rows)),
                   extra={"words": words, "first_token": word_index},
                   per_token=Encoded.per_token + ("labels",))


def _answers(row: Row, name: str, context: str):
    """SQuAD-style answers {"text": [..], "answer_start": [..]} -> [(start, end, text)]."""
    a = _get(row, name)
    if not isinstance(a, dict) or "text" not in a or "answer_start" not in a:
        raise DataError(f"{row.where}: field {name!r} must look like "
                        f'{{"text": [...], "answer_start": [...]}}, got {a!r:.80}')
    texts, starts = a["text"], a["answer_start"]
    texts = [texts] if isinstance(texts, str) else texts
    starts = [starts] if isinstance(starts, int) else starts
    out = []
    for t, s in zip(texts, starts):
        if context[s:s + len(t)] != t:
            raise DataError(f"{row.where}: answer {t!r} is not at character {s} of the context")
        out.append((s, s + len(t), t))
    return out


def _encode_qa(rows, cfg, tok, with_labels) -> Encoded:
    """Question + context windows (``data.doc_stride`` tokens of overlap), answer char span
    -> token start/end; a window without the answer points at [CLS] (position 0)."""
    d = cfg.data
    questions = [get_text(r, d.text_field) for r in rows]
    contexts = [get_text(r, d.text_pair_field or "context") for r in rows]
    q_len = max(len(x) for x in tok(questions, add_special_tokens=False)["input_ids"])
    if q_len + 3 >= d.seq_len:
        raise DataError(f"a question has {q_len} tokens: too long for data.seq_len={d.seq_len}")
    stride = min(d.doc_stride, max(d.seq_len - q_len - 4, 1) // 2)
    enc = tok(questions, contexts, truncation="only_second", max_length=d.seq_len, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
    sample = np.asarray(enc["overflow_to_sample_mapping"], np.int64)
    answers = [_answers(r, d.label_field, c) for r, c in zip(rows, contexts)] if with_labels else None
    starts, ends, offsets = [], [], []
    for f, ex in enumerate(sample):
        seq_ids = enc.sequence_ids(f)
        off = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq_ids)]
        offsets.append(off)
        st = en = 0
        if answers is not None and answers[ex]:
            a_start, a_end, _ = answers[ex][0]
            ctx = [j for j, o in enumerate(off) if o is not None]
            if ctx and off[ctx[0]][0] <= a_start and off[ctx[-1]][1] >= a_end:
                st = next(j for j in ctx if off[j][1] > a_start)
                en = next(j for j in reversed(ctx) if off[j][0] < a_end)
        starts.append(st)
        ends.append(en)
    ids = list(enc["input_ids"])
    _check_vocab(ids, [rows[i] for i in sample], cfg.model.vocab_size)
    arrays, lengths = _base_arrays(ids, list(enc["token_type_ids"]) if cfg.model.type_vocab > 0
                                   else None, d.seq_len, tok.pad_token_id or 0)
    arrays["start_positions"] = np.asarray(starts, np.int32)
    arrays["end_positions"] = np.asarray(ends, np.int32)
    n_windows = np.bincount(sample, minlength=len(rows))
    return Encoded(arrays, lengths, len(rows), int((n_windows > 1).sum()), sample,
                   extra={"offsets": offsets, "contexts": contexts, "answers": answers})


# ---------------------------------------------------------------- batching


def bucket_of(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _take(enc: Encoded, idx: np.ndarray, width: int, batch: int) -> dict:
    """Rows ``idx`` cut to ``width`` tokens, padded to ``batch`` rows with weight-0 rows."""
    out = {}
    for k, v in enc.arrays.items():
        x = v[idx]
        if k in enc.per_token:
            x = x[:, :width]
        if len(idx) < batch:
            fill = np.zeros((batch - len(idx),) + x.shape[1:], x.dtype)
            if k == "labels" and x.ndim == 2 and x.dtype == np.int32:
                fill[:] = IGNORE
            x = np.concatenate([x, fill])
        out[k] = x
    w = np.zeros(batch, np.float32)
    w[:len(idx)] = 1.0
    out["example_weights"] = w
    return out


def epoch_plan(lengths: np.ndarray, buckets: tuple[int, ...], batch: int, seed: int,
               shuffle: bool = True) -> list[tuple[np.ndarray, int]]:
    """One epoch of (row indices, padded width): full batches within each bucket; the
    leftovers of all buckets are sorted by length and batched together at the width of
    their longest row (the last one may be short: padded with weight-0 rows). The order
    of batches is shuffled; everything depends only on (seed, lengths)."""
    rng = np.random.default_rng(seed)
    b_of = bucket_of(lengths, buckets)
    plan, left = [], []
    for b in range(len(buckets)):
        idx = np.flatnonzero(b_of == b)
        if shuffle:
            idx = rng.permutation(idx)
        full = len(idx) // batch * batch
        plan += [(idx[i:i + batch], buckets[b]) for i in range(0, full, batch)]
        left.append(idx[full:])
    rest = np.concatenate(left) if left else np.zeros(0, np.int64)
    rest = rest[np.argsort(lengths[rest], kind="stable")]
    for i in range(0, len(rest), batch):
        chunk = rest[i:i + batch]
        plan.append((chunk, buckets[b_of[chunk].max()]))
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def batches_per_epoch(lengths: np.ndarray, buckets: tuple[int, ...], batch: int) -> int:
    return len(epoch_plan(lengths, buckets, batch, 0, shuffle=False))


def train_batches(enc: Encoded, data: DataConfig, batch: int, seed: int, start_step: int = 0):
    """Endless bucketed batches (numpy dicts); epoch e is shuffled with seed + e."""
    buckets = bucket_lengths(data)
    step, epoch = 0, 0
    while True:
        for idx, width in epoch_plan(enc.lengths, buckets, batch, seed + epoch, data.shuffle):
            if step >= start_step:
                yield _take(enc, idx, width, batch)
            step += 1
        epoch += 1


def eval_plan(enc: Encoded, data: DataConfig, batch: int):
    """Every feature exactly once: (indices, width) batches grouped by bucket, in order."""
    buckets = bucket_lengths(data)
    b_of = bucket_of(enc.lengths, buckets)
    for b in range(len(buckets)):
        idx = np.flatnonzero(b_of == b)
        for i in range(0, len(idx), batch):
            yield idx[i:i + batch], buckets[b]


def take(enc: Encoded, idx: np.ndarray, width: int, batch: int) -> dict:
    return _take(enc, idx, width, batch)
