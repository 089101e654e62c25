"""Language-model data: tokenize documents and pack them into fixed-length rows.

Packing puts several documents in one row. Each document gets its own segment
id (1, 2, ...; 0 = padding) and positions restarting at 0, so with the
segment-aware attention mask no token sees another document: the model
computes on real tokens, not padding.
"""
from __future__ import annotations

import numpy as np

from jtl.data.sources import DataError

MLM_KEYS = ("input_ids", "segment_ids", "positions", "mlm_eligible")
CLM_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_weights")


def _pieces_mlm(ids: list[int], seq_len: int, cls: int, sep: int):
    body = seq_len - 2
    for i in range(0, len(ids), body):
        yield [cls] + ids[i:i + body] + [sep]


def _pieces_clm(ids: list[int], seq_len: int, eos: int | None):
    ids = ids + ([eos] if eos is not None else [])
    # Each piece of n+1 tokens gives n (input, target) pairs.
    for i in range(0, max(len(ids) - 1, 1), seq_len):
        piece = ids[i:i + seq_len + 1]
        if len(piece) >= 2:
            yield piece


def pack(pieces, seq_len: int, kind: str, pad_id: int, specials: set[int], pack_rows: bool = True):
    """Greedy next-fit packing of token pieces into [N, seq_len] arrays. A CLM piece may
    be ``(ids, target_weights)`` (SFT: weight 0 on prompt targets), else every target
    of it weighs 1."""
    rows: list[list[list[int]]] = []
    used = seq_len + 1
    for piece in pieces:
        ids = piece[0] if isinstance(piece, tuple) else piece
        n = len(ids) - 1 if kind == "clm" else len(ids)
        if not pack_rows or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += n
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in (MLM_KEYS if kind == "mlm" else CLM_KEYS)}
    out["input_ids"][:] = pad_id
    if kind == "clm":
        out["loss_weights"] = out["loss_weights"].astype(np.float32)
    for r, docs in enumerate(rows):
        at = 0
        for s, piece in enumerate(docs, 1):
            piece, weights = piece if isinstance(piece, tuple) else (piece, None)
            inp = piece[:-1] if kind == "clm" else piece
            n = len(inp)
            out["input_ids"][r, at:at + n] = inp
            out["segment_ids"][r, at:at + n] = s
            out["positions"][r, at:at + n] = np.arange(n)
            if kind == "clm":
                out["targets"][r, at:at + n] = piece[1:]
                out["loss_weights"][r, at:at + n] = 1 if weights is None else weights
            else:
                out["mlm_eligible"][r, at:at + n] = [t not in specials for t in inp]
            at += n
    if kind == "mlm":
        out["mlm_eligible"] = out["mlm_eligible"].astype(bool)
    return out


def build_lm_rows(texts: list[str], wheres: list[str], tok, *, kind: str, seq_len: int,
                  vocab_limit: int, pack_rows: bool = True) -> dict:
    """Tokenize ``texts`` and pack into rows; checks every id against the model vocab."""
    from jtl.data.tokenizer import special_ids
    sp = special_ids(tok)
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    for ids, where in zip(enc, wheres):
        if ids and max(ids) >= vocab_limit:
            raise DataError(f"{where}: token id {max(ids)} >= model.vocab_size={vocab_limit}; "
                            f"the tokenizer ({len(tok)} tokens) does not match the model "
                            f"(JAX would silently clamp the id)")
    if kind == "mlm":
        if sp["cls"] is None or sp["sep"] is None or sp["mask"] is None:
            raise DataError("MLM needs a tokenizer with [CLS], [SEP] and [MASK] tokens")
        pieces = (p for ids in enc if ids for p in _pieces_mlm(ids, seq_len, sp["cls"], sp["sep"]))
    else:
        pieces = (p for ids in enc if ids for p in _pieces_clm(ids, seq_len, sp["eos"]))
    specials = {i for i in sp.values() if i is not None}
    rows = pack(pieces, seq_len, kind, sp["pad"], specials, pack_rows)
    if not len(rows["input_ids"]):
        raise DataError("no tokens in the training text")
    return rows


def real_tokens(batch: dict) -> int:
    return int((np.asarray(batch["segment_ids"]) > 0).sum())
