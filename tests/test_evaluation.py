"""Metrics against reference implementations (sklearn, scipy, seqeval) on fixed inputs."""
from __future__ import annotations

import numpy as np
import pytest

from jtl import evaluation as E

rng = np.random.default_rng(0)
Y2_T, Y2_P = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
Y3_T = rng.integers(0, 3, 150)
Y3_P = np.where(rng.random(150) < 0.6, Y3_T, rng.integers(0, 3, 150))


def test_classification_metrics_match_sklearn():
    from sklearn import metrics as M
    assert E.accuracy(Y3_T, Y3_P) == pytest.approx(M.accuracy_score(Y3_T, Y3_P))
    assert E.f1_binary(Y2_T, Y2_P) == pytest.approx(M.f1_score(Y2_T, Y2_P))
    assert E.macro_f1(Y3_T, Y3_P) == pytest.approx(M.f1_score(Y3_T, Y3_P, average="macro"))
    assert E.mcc(Y2_T, Y2_P) == pytest.approx(M.matthews_corrcoef(Y2_T, Y2_P))
    assert E.mcc(Y3_T, Y3_P) == pytest.approx(M.matthews_corrcoef(Y3_T, Y3_P))
    # degenerate: one class predicted everywhere
    assert E.mcc(Y2_T, np.zeros_like(Y2_T)) == pytest.approx(M.matthews_corrcoef(Y2_T, np.zeros_like(Y2_T)))
    assert E.f1_binary([0, 0], [0, 0]) == 0.0


def test_multilabel_micro_f1_matches_sklearn():
    from sklearn import metrics as M
    t, p = rng.integers(0, 2, (50, 4)), rng.integers(0, 2, (50, 4))
    s = E.multilabel_scores(t, p)
    assert s["micro_f1"] == pytest.approx(M.f1_score(t, p, average="micro"))
    assert s["macro_f1"] == pytest.approx(M.f1_score(t, p, average="macro"))
    assert s["accuracy"] == pytest.approx(M.accuracy_score(t, p))


def test_correlations_match_scipy():
    from scipy import stats
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    y[::7] = y[3]  # ties for spearman
    assert E.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert E.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    r = E.regression_scores(x, y)
    assert r["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _random_tag_seqs(n, seed):
    r = np.random.default_rng(seed)
    return [[TAGS[i] for i in r.integers(0, len(TAGS), r.integers(1, 15))] for _ in range(n)]


def test_entity_scores_match_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    true = _random_tag_seqs(300, 1)
    # predictions: true tags with some noise (also ill-formed I- starts)
    r = np.random.default_rng(2)
    pred = [[t if r.random() < 0.7 else TAGS[r.integers(0, len(TAGS))] for t in s] for s in true]
    ours = E.entity_scores(true, pred)
    assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(true, pred))
    assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(true, pred))
    assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(true, pred))
    assert ours["token_accuracy"] == pytest.approx(seqeval.accuracy_score(true, pred))


def test_entities_hand_checked():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "B-PER", "I-LOC"]
    assert E.entities(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("PER", 6, 6),
                                ("LOC", 7, 7)}


def test_squad_scores():
    preds = ["the Eiffel Tower", "Paris", "in 1889", ""]
    golds = [["Eiffel Tower"], ["Paris, France", "paris"], ["1889"], ["something"]]
    s = E.squad_scores(preds, golds)
    # EM: 1 (articles dropped), 1 (second gold), 0, 0; F1: 1, 1, 2/3, 0
    assert s["squad_exact"] == pytest.approx(50.0)
    assert s["squad_f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)
