"""Token classification (NER, CoNLL-2003): per-token head, tags on each word's first
sub-token, entity-level F1 over words (also those cut by truncation)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jtl import evaluation as E
from jtl.data import tasks as T
from jtl.data.sources import DataError
from jtl.tasks.base import Task, register, xent


def _words(row, name: str) -> list[str]:
    v = T.field(row, name)
    if not isinstance(v, list) or not all(isinstance(w, str) for w in v):
        raise DataError(f"{row.where}: field {name!r} must be a list of words for token "
                        f"classification, got {type(v).__name__}")
    if not v:
        raise DataError(f"{row.where}: field {name!r} is empty")
    return v


class TokenClassification(Task):
    name, head, labels_from_data = "token_classification", "token", "list"
    metrics = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss")
    default_metric = "entity_f1"

    def loss(self, cfg, spec, model, batch, rng):
        logits = self.head_logits(cfg, model, batch, rng)
        w = batch["example_weights"]
        tw = (batch["labels"] >= 0) * w[:, None]
        loss = xent(logits, jnp.maximum(batch["labels"], 0), cfg.task.label_smoothing) * tw
        correct = ((logits.argmax(-1) == batch["labels"]) * tw).sum()
        count = w.sum() * spec.label_tokens_per_row if spec.label_tokens_per_row else tw.sum()
        return loss.sum(), count, {"logits": logits, "correct": correct, "scored": tw.sum()}

    def encode(self, rows, cfg, tok, labels, with_labels=True):
        d = cfg.data
        words = [_words(r, d.text_field) for r in rows]
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=d.seq_len,
                  return_token_type_ids=False)
        lm = T.LabelMap(labels, d.label_field)
        ids, lab_seqs, word_index, n_trunc = [], [], [], 0
        for i, r in enumerate(rows):
            s = enc["input_ids"][i]
            tags = None
            if with_labels:
                raw = T.field(r, d.label_field)
                if not isinstance(raw, list) or len(raw) != len(words[i]):
                    raise DataError(f"{r.where}: field {d.label_field!r} must be a list with one tag per "
                                    f"word ({len(words[i])} words), got {raw!r:.80}")
                tags = [lm(t, r.where) for t in raw]
            lab, first_tok, prev = [T.IGNORE] * len(s), [], None
            for j, w in enumerate(enc.word_ids(i)):
                if w is not None and w != prev:
                    lab[j] = tags[w] if tags is not None else 0
                    first_tok.append(j)
                prev = w
            if len(first_tok) < len(words[i]):
                n_trunc += 1
            ids.append(s)
            lab_seqs.append(lab)
            word_index.append(first_tok)
        T.check_vocab(ids, rows, cfg.model.vocab_size)
        arrays, lengths = T.base_arrays(ids, None, d.seq_len, tok.pad_token_id or 0)
        arrays["labels"] = T.pad(lab_seqs, d.seq_len, T.IGNORE)
        extra = {"words": words, "first_token": word_index}
        if with_labels:  # word-level gold tags (all words, also those cut by truncation)
            extra["gold"] = [[lm(t, r.where) for t in r.data[d.label_field]] for r in rows]
        return T.Encoded(arrays, lengths, len(rows), n_trunc, np.arange(len(rows)), extra=extra,
                         per_token=T.Encoded.per_token + ("labels",))

    def decode(self, cfg, enc, logits):
        labels = cfg.data.labels
        pred = logits.argmax(-1)
        fill = "O" if "O" in labels else labels[0]
        rows = []
        for i, (words, first) in enumerate(zip(enc.extra["words"], enc.extra["first_token"])):
            tags = [labels[int(pred[i, j])] for j in first]
            rows.append({"tokens": words, "tags": tags + [fill] * (len(words) - len(tags))})
        return rows

    def score(self, cfg, enc, logits, preds=None):
        preds = preds if preds is not None else self.decode(cfg, enc, logits)
        labels = cfg.data.labels
        gold = [[labels[t] for t in row] for row in enc.extra["gold"]]
        return E.entity_scores(gold, [p["tags"] for p in preds])


register(TokenClassification())
