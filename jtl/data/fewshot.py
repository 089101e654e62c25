"""Few-shot training subsets: ``data.max_train_examples`` / ``data.examples_per_label``.

Label-efficiency experiments train on a small labelled subset of ``data.train``. The
subset is drawn here, after the label list is fixed from the *whole* training split
(so every budget sees the same classes in the same order), from the training rows
only (evaluation splits are never sampled), reproducibly per ``data.sample_seed``:

* ``examples_per_label=k``: k rows of each label (classification only); a label with
  fewer than k rows is an error naming it.
* ``max_train_examples=n``: n rows. For classification the draw is stratified: each
  label gets its share of n in proportion to its frequency (largest remainders, at
  least one row per label when n allows), so a 50-row subset of a 55/45 dataset has
  28 and 22, not whatever a plain shuffle gives. Other tasks draw n rows uniformly.

The same seed gives the same subset, and a smaller budget's subset is a prefix of a
larger one's per label (rows are ranked once per seed), so budgets are nested.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from jtl.config import Config, ConfigError
from jtl.data.sources import DataError, Row

log = logging.getLogger("jtl")


def _shares(counts: dict[str, int], n: int) -> dict[str, int]:
    """n split over labels in proportion to counts (largest remainders), >= 1 each when n allows."""
    total = sum(counts.values())
    raw = {k: n * c / total for k, c in counts.items()}
    share = {k: min(counts[k], math.floor(v)) for k, v in raw.items()}
    if n >= len(counts):
        for k in share:
            if share[k] == 0 and counts[k] > 0:
                share[k] = 1
    order = sorted(counts, key=lambda k: (-(raw[k] - math.floor(raw[k])), k))
    i = 0
    while sum(share.values()) < n and i < 10 * len(order) + n:
        k = order[i % len(order)]
        if share[k] < counts[k]:
            share[k] += 1
        i += 1
    while sum(share.values()) > n:  # the ">= 1 each" bump overshot: take from the largest
        k = max(share, key=lambda k: (share[k], k))
        share[k] -= 1
    return share


def subset(rows: list[Row], cfg: Config, labels: tuple[str, ...] | None) -> list[Row]:
    """The few-shot training subset of ``rows`` (``rows`` itself when no budget is set)."""
    d = cfg.data
    if d.max_train_examples is None and d.examples_per_label is None:
        return rows
    if d.max_train_examples is not None and d.examples_per_label is not None:
        raise ConfigError("set data.max_train_examples or data.examples_per_label, not both")
    stratify = cfg.task.kind == "classification" and labels is not None
    if d.examples_per_label is not None and not stratify:
        raise ConfigError(f"data.examples_per_label needs task.kind=classification, got {cfg.task.kind!r} "
                          f"(use data.max_train_examples)")
    rng = np.random.default_rng(d.sample_seed)
    rank = rng.permutation(len(rows))  # one ranking per seed: smaller budgets are nested in larger
    if not stratify:
        n = d.max_train_examples
        if n >= len(rows):
            log.info("data.max_train_examples=%d >= %d training rows: using all", n, len(rows))
            return rows
        keep = np.sort(rank[:n])
        return [rows[i] for i in keep]
    from jtl.data.tasks import LabelMap, field
    label_map = LabelMap(labels, d.label_field)
    by_label: dict[str, list[int]] = {k: [] for k in labels}
    for i in rank:  # in rank order, so each label's list is that label's ranking
        r = rows[i]
        by_label[labels[label_map(field(r, d.label_field), r.where)]].append(int(i))
    counts = {k: len(v) for k, v in by_label.items()}
    if d.examples_per_label is not None:
        short = {k: c for k, c in counts.items() if c < d.examples_per_label}
        if short:
            raise DataError(f"{d.train}: data.examples_per_label={d.examples_per_label} but label(s) "
                            + ", ".join(f"{k!r} have {c}" for k, c in short.items()))
        share = {k: d.examples_per_label for k in counts}
    else:
        if d.max_train_examples >= len(rows):
            log.info("data.max_train_examples=%d >= %d training rows: using all", d.max_train_examples, len(rows))
            return rows
        share = _shares(counts, d.max_train_examples)
    keep = sorted(i for k, idx in by_label.items() for i in idx[:share[k]])
    log.info("few-shot subset (data.sample_seed=%d): %d of %d training rows (%s)", d.sample_seed, len(keep),
             len(rows), ", ".join(f"{k}: {share[k]}" for k in labels))
    return [rows[i] for i in keep]
