"""Extractive question answering (SQuAD): question + context windows, start/end logits,
the best span over all of a row's windows, SQuAD exact match / F1."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jtl import evaluation as E
from jtl.data import tasks as T
from jtl.data.sources import DataError, get_text
from jtl.tasks.base import Task, register, xent


def _answers(row, name: str, context: str):
    """SQuAD-style answers {"text": [..], "answer_start": [..]} -> [(start, end, text)]."""
    a = T.field(row, name)
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


class QA(Task):
    name, head = "qa", "span"
    metrics = ("squad_f1", "squad_exact", "loss")
    default_metric = "squad_f1"

    def num_labels(self, cfg):
        return 2

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["example_weights"]
        valid = batch["segment_ids"] > 0
        start = jnp.where(valid, logits[..., 0], -1e9)
        end = jnp.where(valid, logits[..., 1], -1e9)
        loss = 0.5 * (xent(start, batch["start_positions"]) + xent(end, batch["end_positions"]))
        return (loss * w).sum(), w.sum(), {"logits": logits}

    def encode(self, rows, cfg, tok, labels=None, with_labels=True):
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
        T.check_vocab(ids, [rows[i] for i in sample], cfg.model.vocab_size)
        arrays, lengths = T.base_arrays(ids, list(enc["token_type_ids"]) if cfg.model.type_vocab > 0
                                        else None, d.seq_len, tok.pad_token_id or 0)
        arrays["start_positions"] = np.asarray(starts, np.int32)
        arrays["end_positions"] = np.asarray(ends, np.int32)
        n_windows = np.bincount(sample, minlength=len(rows))
        return T.Encoded(arrays, lengths, len(rows), int((n_windows > 1).sum()), sample,
                         extra={"offsets": offsets, "contexts": contexts, "answers": answers})

    def spans(self, cfg, enc, logits):
        """Best (start char, end char, score) per row over all of its windows."""
        best = [(0, 0, -math.inf)] * enc.n_rows
        k, max_len = 20, cfg.data.max_answer_tokens
        for f in range(len(enc)):
            off = enc.extra["offsets"][f]
            ctx = np.array([o is not None for o in off] + [False] * (logits.shape[1] - len(off)))
            st = np.where(ctx, logits[f, :, 0], -np.inf)
            en = np.where(ctx, logits[f, :, 1], -np.inf)
            ex = int(enc.example_of[f])
            for i in np.argsort(-st)[:k]:
                for j in np.argsort(-en)[:k]:
                    if not (ctx[i] and ctx[j]) or j < i or j - i + 1 > max_len:
                        continue
                    s = float(st[i] + en[j])
                    if s > best[ex][2]:
                        best[ex] = (off[i][0], off[j][1], s)
        return best

    def decode(self, cfg, enc, logits):
        return [{"answer": ctx[a:b], "start": a, "end": b, "score": s}
                for (a, b, s), ctx in zip(self.spans(cfg, enc, logits), enc.extra["contexts"])]

    def score(self, cfg, enc, logits, preds=None):
        preds = preds if preds is not None else self.decode(cfg, enc, logits)
        golds = [[t for _, _, t in a] for a in enc.extra["answers"]]
        return E.squad_scores([p["answer"] for p in preds], golds)


register(QA())
