"""Task metrics on host numpy arrays (plain numpy; checked against sklearn, scipy and
seqeval in tests/test_evaluation.py).

* ``accuracy``, ``f1`` (binary, positive class = label index 1), ``macro_f1``, ``mcc``
* ``pearson``, ``spearman`` (regression)
* ``entity_f1`` / ``entity_precision`` / ``entity_recall``: CoNLL entity spans from
  IOB/IOB2 tags (an ``I-X`` after something other than ``B-X``/``I-X`` starts a new
  entity, as conlleval and seqeval's default mode do)
* ``squad_exact`` / ``squad_f1``: SQuAD v1.1 answer normalisation, max over gold answers
* ``generation_score``: generated text against references (SFT validation): exact match,
  label-word accuracy, corpus BLEU (sacrebleu)
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np

METRICS = ("accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "entity_f1",
           "entity_precision", "entity_recall", "token_accuracy", "squad_exact", "squad_f1",
           "micro_f1", "loss")


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def f1_binary(y_true, y_pred, positive: int = 1) -> float:
    t, p = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
    return _prf((t & p).sum(), (~t & p).sum(), (t & ~p).sum())[2]


def macro_f1(y_true, y_pred, num_labels: int | None = None) -> float:
    """Mean F1 over the classes present in ``y_true`` or ``y_pred`` (as sklearn's average='macro')."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(y_true, y_pred)
    return float(np.mean([f1_binary(y_true, y_pred, c) for c in classes])) if len(classes) else 0.0


def mcc(y_true, y_pred) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, as sklearn)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(y_true, y_pred)
    k = len(classes)
    ti, pi = np.searchsorted(classes, y_true), np.searchsorted(classes, y_pred)
    c = np.zeros((k, k), np.float64)
    np.add.at(c, (ti, pi), 1)
    t_sum, p_sum, correct, s = c.sum(1), c.sum(0), np.trace(c), c.sum()
    cov_tp = correct * s - t_sum @ p_sum
    cov_pp = s * s - p_sum @ p_sum
    cov_tt = s * s - t_sum @ t_sum
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp else 0.0


def pearson(x, y) -> float:
    from scipy.stats import pearsonr
    return float(pearsonr(np.asarray(x, np.float64), np.asarray(y, np.float64))[0])


def spearman(x, y) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(np.asarray(x, np.float64), np.asarray(y, np.float64))[0])


# ---------------------------------------------------------------- entities (BIO)


def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", "", None):
        return "O", ""
    if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag  # a bare type name counts as inside


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) spans of one sentence's IOB/IOB2 tags (conlleval rules)."""
    out, start, etype = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = _split_tag(tag)
        ends = start is not None and (prefix in ("O", "B", "S") or t != etype)
        if ends:
            out.add((etype, start, i - 1))
            start, etype = None, None
        if prefix in ("B", "S") or (prefix == "I" and start is None) or \
                (prefix == "E" and start is None):
            start, etype = i, t
        if prefix in ("E", "S") and start is not None:
            out.add((etype, start, i))
            start, etype = None, None
    return out


def entity_scores(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict:
    tp = fp = fn = 0
    correct = total = 0
    for t, p in zip(true_seqs, pred_seqs):
        if len(t) != len(p):
            raise ValueError(f"tag sequences differ in length: {len(t)} vs {len(p)}")
        et, ep = entities(t), entities(p)
        tp += len(et & ep)
        fp += len(ep - et)
        fn += len(et - ep)
        correct += sum(a == b for a, b in zip(t, p))
        total += len(t)
    prec, rec, f1 = _prf(tp, fp, fn)
    return {"entity_precision": prec, "entity_recall": rec, "entity_f1": f1,
            "token_accuracy": correct / max(total, 1)}


# ---------------------------------------------------------------- SQuAD


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1_tokens(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict:
    em = f1 = 0.0
    for pred, gold in zip(predictions, golds):
        gold = gold or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in gold)
        f1 += max(_f1_tokens(pred, g) for g in gold)
    n = max(len(predictions), 1)
    return {"squad_exact": 100.0 * em / n, "squad_f1": 100.0 * f1 / n}


# ---------------------------------------------------------------- per task


def classification_scores(y_true, y_pred, num_labels: int) -> dict:
    out = {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred),
           "mcc": mcc(y_true, y_pred)}
    if num_labels == 2:
        out["f1"] = f1_binary(y_true, y_pred)
    return out


def regression_scores(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    ok = len(y_true) > 1 and y_true.std() > 0 and y_pred.std() > 0
    return {"pearson": pearson(y_true, y_pred) if ok else 0.0,
            "spearman": spearman(y_true, y_pred) if ok else 0.0,
            "mse": float(np.mean((y_true - y_pred) ** 2))}


def multilabel_scores(y_true, y_pred) -> dict:
    """y_*: [N, C] 0/1. Micro F1 over all (row, label) decisions, exact-match accuracy."""
    t, p = np.asarray(y_true) > 0.5, np.asarray(y_pred) > 0.5
    _, _, f = _prf((t & p).sum(), (~t & p).sum(), (t & ~p).sum())
    per_label = [_prf((t[:, c] & p[:, c]).sum(), (~t[:, c] & p[:, c]).sum(),
                      (t[:, c] & ~p[:, c]).sum())[2] for c in range(t.shape[1])]
    return {"accuracy": float((t == p).all(1).mean()), "micro_f1": f, "f1": f,
            "macro_f1": float(np.mean(per_label)) if per_label else 0.0}


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


def generation_score(metric: str, completions: list[str], references: list[str]) -> float:
    """``exact_match``: the share of completions equal to their reference (surrounding
    whitespace ignored); ``label_accuracy``: the share whose first word is the reference's
    first word (case and surrounding punctuation ignored: " Positive." = "positive");
    ``bleu``: sacrebleu's corpus BLEU (0-100) with its default tokenizer."""
    if len(completions) != len(references) or not references:
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    if metric == "exact_match":
        return float(np.mean([c.strip() == r.strip() for c, r in zip(completions, references)]))
    if metric == "label_accuracy":
        return float(np.mean([_first_word(c) == _first_word(r) for c, r in zip(completions, references)]))
    if metric == "bleu":
        import sacrebleu
        return float(sacrebleu.corpus_bleu(completions, [references]).score)
    raise ValueError(f"unknown generation metric {metric!r} (exact_match, label_accuracy, bleu)")
