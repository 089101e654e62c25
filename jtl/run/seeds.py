"""Multi-seed runs: the same config trained once per seed, reported as mean ± std.

``jtl train CONFIG --seeds 0,1,2`` (or :func:`run_seeds`) runs ``CONFIG`` with
``train.seed``, ``data.seed`` and ``data.sample_seed`` all set to each seed, in
``RUN_DIR/seed-<s>``, and writes ``RUN_DIR/seeds.json``: each seed's headline metric
(the final validation metric of a fine-tuning run, the last training loss of a
pretraining run) and their mean and (sample) standard deviation. With a few-shot
budget (``data.max_train_examples`` / ``data.examples_per_label``) every seed draws a
different labelled subset, which is usually the larger source of variance.
"""
from __future__ import annotations

import json
import logging
import statistics
from typing import Callable

from jtl.config import Config, ConfigError

log = logging.getLogger("jtl")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' (inclusive) -> seeds."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers like 0,1,2 or 0-4") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers like 0,1,2 or 0-4")
    return out


def headline(summary: dict) -> tuple[str, float | None]:
    """(name, value) of a run's headline figure."""
    final = summary.get("final", {}).get("validation")
    if final is not None and summary.get("metric") in final:
        return summary["metric"], float(final[summary["metric"]])
    if "train_loss" in summary:
        return "train_loss", float(summary["train_loss"])
    return summary.get("metric", "metric"), None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_config(cfg: Config, seed: int) -> Config:
    return cfg.replace(**{"train.seed": seed, "data.seed": seed, "data.sample_seed": seed,
                          "run_dir": str(cfg.out_dir / f"seed-{seed}")})


def run_seeds(cfg: Config, seeds: list[int], train: Callable[[Config], dict] | None = None) -> dict:
    """Train ``cfg`` once per seed (``train`` defaults to jtl's pretrain/finetune by task)."""
    if train is None:
        from jtl.tasks import get as get_task
        if get_task(cfg.task.kind).pretraining:
            from jtl.pretrain import pretrain as train
        else:
            from jtl.finetune import finetune as train
    runs = []
    for i, s in enumerate(seeds):
        log.info("seed %d (%d of %d)", s, i + 1, len(seeds))
        summary = train(seed_config(cfg, s))
        name, value = headline(summary)
        runs.append({"seed": s, name: value, "run_dir": str(cfg.out_dir / f"seed-{s}")})
        log.info("seed %d: %s %s", s, name, "n/a" if value is None else f"{value:.4f}")
    values = [r[name] for r in runs if r[name] is not None]
    out = {"metric": name, "seeds": seeds, "runs": runs}
    if values:
        out["mean"], out["std"] = mean_std(values)
        log.info("%s over %d seeds: %.4f ± %.4f", name, len(values), out["mean"], out["std"])
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "seeds.json").write_text(json.dumps(out, indent=2))
    return out
