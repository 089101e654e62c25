"""Language-model data: tokenize documents and pack them into fixed-length rows.

Packing puts several documents in one row. Each document gets its own segment
id (1, 2, ...; 0 = padding) and positions restarting at 0, so with the
segment-aware attention mask no token sees another document: the model
computes on real tokens, not padding.
"""
from __future__ import annotations

import logging

import numpy as np

from jtl.data.sources import DataError

log = logging.getLogger("jtl")

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


def tokenize_stripe(tok, texts: list[str], process_index: int, process_count: int):
    """This process's stripe of the documents, ``texts[p::P]``, tokenized: (token count
    of each of its documents, all their ids concatenated), padded to the same shapes in
    every process (``ceil(n/P)`` counts) so that they can be all-gathered."""
    mine = texts[process_index::process_count]
    ids = tok(mine, add_special_tokens=False)["input_ids"] if mine else []
    counts = np.zeros(-(-len(texts) // process_count), np.int32)
    counts[:len(ids)] = [len(x) for x in ids]
    flat = np.concatenate([np.asarray(x, np.int32) for x in ids] or [np.zeros(0, np.int32)])
    return counts, flat


def assemble_stripes(counts_PN: np.ndarray, flat_PT: np.ndarray, n_texts: int) -> list[list[int]]:
    """Every document's ids in document order, from all processes' ``tokenize_stripe``
    outputs stacked (``flat`` zero-padded to the longest)."""
    P = len(counts_PN)
    out: list = [None] * n_texts
    for p in range(P):
        ends = np.cumsum(counts_PN[p])
        for j, i in enumerate(range(p, n_texts, P)):
            out[i] = flat_PT[p, ends[j] - counts_PN[p, j]:ends[j]].tolist()
    return out


def tokenize_all(tok, texts: list[str]) -> list[list[int]]:
    """``tok(texts)``'s ids. With several processes each tokenizes only its stripe of the
    documents and the ids are all-gathered, so the tokenizing work is split while every
    process still plans the one global packing and order (identical to 1 process: a
    document's ids do not depend on which batch it was tokenized in)."""
    import jax
    pc = jax.process_count()
    if pc == 1:
        return tok(texts, add_special_tokens=False)["input_ids"]
    from jax.experimental import multihost_utils
    counts, flat = tokenize_stripe(tok, texts, jax.process_index(), pc)
    log.info("process %d tokenized %d of %d documents (%d tokens); gathering the others' ids",
             jax.process_index(), len(texts[jax.process_index()::pc]), len(texts), len(flat))
    counts_PN = np.asarray(multihost_utils.process_allgather(counts))
    longest = max(int(counts_PN.sum(1).max()), 1)  # every process pads to the same length
    flat_PT = np.asarray(multihost_utils.process_allgather(np.pad(flat, (0, longest - len(flat)))))
    return assemble_stripes(counts_PN, flat_PT, len(texts))


def build_lm_rows(texts: list[str], wheres: list[str], tok, *, kind: str, seq_len: int,
                  vocab_limit: int, pack_rows: bool = True) -> dict:
    """Tokenize ``texts`` (split over the processes: ``tokenize_all``) and pack into rows;
    checks every id against the model vocab."""
    from jtl.data.tokenizer import special_ids
    sp = special_ids(tok)
    enc = tokenize_all(tok, texts)
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
