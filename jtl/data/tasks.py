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
import re
from dataclasses import dataclass, field

import numpy as np

from jtl.config import Config, DataConfig, bucket_lengths
from jtl.data.pipeline import pad_batch
from jtl.data.sources import DataError, Row, get_text

log = logging.getLogger("jtl")
IGNORE = -100


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


def infer_labels(rows: list[Row], cfg: Config, how: str | None) -> tuple[str, ...] | None:
    """The label list: ``data.labels`` if set, else the sorted set of training labels
    (numerically when all are integers), as strings. ``how``: the task's
    ``labels_from_data`` ("value", "list", or None for tasks without labels)."""
    if how is None:
        return None
    if cfg.data.labels:
        return tuple(cfg.data.labels)
    field_ = cfg.data.label_field
    seen = set()
    for r in rows:
        v = field(r, field_)
        if how == "list":
            if not isinstance(v, list):
                raise DataError(f"{r.where}: field {field_!r} must be a list for task.kind="
                                f"{cfg.task.kind!r}, got {type(v).__name__}")
            seen.update(v)
        else:
            seen.add(v)
    keys = {_label_key(v) for v in seen}  # 1 and "1" are one label, not two
    if len(keys) < len(seen):
        log.warning("%s: field %r mixes label types (%s); labels equal as text are merged",
                    cfg.data.train, field_, ", ".join(sorted({type(v).__name__ for v in seen})))
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def field(row: Row, name: str):
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


def check_vocab(ids_list, rows, vocab_limit):
    for ids, r in zip(ids_list, rows):
        if ids and max(ids) >= vocab_limit:
            raise DataError(f"{r.where}: token id {max(ids)} >= model.vocab_size={vocab_limit}; "
                            f"the tokenizer does not match the model")


def pad(seqs: list[list[int]], seq_len: int, pad: int) -> np.ndarray:
    out = np.full((len(seqs), seq_len), pad, np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def base_arrays(ids, types, seq_len, pad_id):
    lengths = np.array([len(s) for s in ids], np.int32)
    input_ids = pad(ids, seq_len, pad_id)
    seg = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": input_ids, "segment_ids": seg,
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), input_ids.shape).copy()}
    if types is not None:
        arrays["token_type_ids"] = pad(types, seq_len, 0)
    return arrays, lengths


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


def encode_texts(rows: list[Row], cfg: Config, tok) -> Encoded:
    """The inputs of a sequence task (text, or text pair with ``data.text_pair_field``),
    truncated to ``data.seq_len``; the task adds its ``labels`` array."""
    d = cfg.data
    first = [get_text(r, d.text_field) for r in rows]
    second = [get_text(r, d.text_pair_field) for r in rows] if d.text_pair_field else None
    ids, types, n_trunc = _tokenize_texts(tok, first, second, d.seq_len)
    check_vocab(ids, rows, cfg.model.vocab_size)
    arrays, lengths = base_arrays(ids, types if cfg.model.type_vocab > 0 else None, d.seq_len,
                                  tok.pad_token_id or 0)
    return Encoded(arrays, lengths, len(rows), n_trunc, np.arange(len(rows)))


# ---------------------------------------------------------------- batching


def bucket_of(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def take(enc: Encoded, idx: np.ndarray, width: int, batch: int) -> dict:
    """Rows ``idx`` cut to ``width`` tokens, padded to ``batch`` rows with weight-0 rows
    (token labels of padding rows are IGNORE)."""
    chunk = {k: (v[idx][:, :width] if k in enc.per_token else v[idx]) for k, v in enc.arrays.items()}
    fill = {"labels": IGNORE} if "labels" in enc.per_token else None
    return pad_batch(chunk, batch, fill)


def take_share(enc: Encoded, idx: np.ndarray, width: int, batch: int) -> dict:
    """This process's rows of ``take(enc, idx, width, batch)`` (``process_rows``' convention),
    built without building the others' rows."""
    import jax
    pc = jax.process_count()
    if pc == 1:
        return take(enc, idx, width, batch)
    if batch % pc:
        raise ValueError(f"a global batch of {batch} rows does not split over {pc} processes")
    per, pi = batch // pc, jax.process_index()
    return take(enc, idx[pi * per:(pi + 1) * per], width, per)


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


class BucketedBatches:
    """Endless bucketed training batches (numpy dicts, this process's rows of each
    global batch); epoch e is shuffled with seed + e. The state is the step count
    (``get_state``/``set_state``, checkpointed like the pretraining iterator's)."""

    def __init__(self, enc: Encoded, data: DataConfig, batch: int, seed: int, start_step: int = 0):
        self.enc, self.batch, self.seed, self.shuffle = enc, batch, seed, data.shuffle
        self.buckets = bucket_lengths(data)
        self.per_epoch = batches_per_epoch(enc.lengths, self.buckets, batch)
        self.step = start_step
        self._plan, self._epoch = None, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, i = divmod(self.step, self.per_epoch)
        if epoch != self._epoch:
            self._plan = epoch_plan(self.enc.lengths, self.buckets, self.batch, self.seed + epoch, self.shuffle)
            self._epoch = epoch
        idx, width = self._plan[i]
        self.step += 1
        return take_share(self.enc, idx, width, self.batch)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def eval_plan(enc: Encoded, data: DataConfig, batch: int):
    """Every feature exactly once: (indices, width) batches grouped by bucket, in order."""
    buckets = bucket_lengths(data)
    b_of = bucket_of(enc.lengths, buckets)
    for b in range(len(buckets)):
        idx = np.flatnonzero(b_of == b)
        for i in range(0, len(idx), batch):
            yield idx[i:i + batch], buckets[b]


