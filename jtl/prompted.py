"""Prompted evaluation of a decoder on a classification task: zero- and k-shot, by
the log-likelihood of each label word after the prompt.

    jtl eval-prompted RUN|WEIGHTS CONFIG [--shots 0,4] [--template "Review: {text}\\nSentiment:"]
                      [--label-words negative,positive] [--split validation] [--max-examples N]
                      [--seed 0] [--output result.json]

For every example the prompt is ``k`` demonstrations (sampled with ``--seed`` from
the task's training split, each ``template`` + " " + its label word + "\\n\\n")
followed by ``template`` filled with the example's text; each label word (with a
leading space) is scored as the sum of its tokens' log-probabilities after that
prompt, and the prediction is the best-scoring label. Reported: accuracy, the rate
of the most frequent prediction (``majority_rate``: 1.0 means the model always
says the same label) and the predicted-label counts, so a model that always
answers "positive" is visible next to its accuracy.

Scoring runs a jitted forward over right-padded rows of a power-of-two width:
padding never changes a score (causal attention; pad slots carry no weight), so
results do not depend on the batch size.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtl import sharding as S
from jtl.config import ConfigError
from jtl.data.sources import get_text, read_rows

log = logging.getLogger("jtl")


def _width(n: int) -> int:
    w = 16
    while w < n:
        w *= 2
    return w


class Scorer:
    """Sum of log p(continuation | context) under a ``jtl.generate.Generator``'s model.

    A row is context + continuation; the model reads all its tokens but the last (so a
    row may be ``model.max_len`` + 1 tokens) and each continuation token is scored from
    the position before it."""

    def __init__(self, gen):
        self.gen = gen
        self._fn = jax.jit(self._score)

    def _score(self, params, ids_BS, targets_BS, weights_BS):
        m = self.gen.m
        model = nnx.merge(self.gen.graphdef, params)
        seg = (weights_BS >= 0).astype(jnp.int32)  # -1 marks padding
        h = model.backbone(m, ids_BS, seg, None)
        logp = jax.nn.log_softmax(self.gen._logits(model, h), axis=-1)
        tok = jnp.take_along_axis(logp, targets_BS[..., None], axis=-1)[..., 0]
        w = jnp.maximum(weights_BS, 0)
        greedy = (jnp.argmax(logp, -1) == targets_BS) | (w == 0)
        return jnp.sum(tok * w, axis=-1), jnp.all(greedy, axis=-1)

    def __call__(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
        """``pairs`` of (context ids, continuation ids) -> summed log-probabilities."""
        return self.score(pairs, batch_size)[0]

    def score(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
              desc: str = "scoring") -> tuple[list[float], list[bool]]:
        """(summed log-probabilities, whether greedy decoding gives each continuation)."""
        from jtl.metrics import progress
        logp, greedy = [0.0] * len(pairs), [False] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        limit = self.gen.m.max_len
        bar = progress(len(pairs), len(pairs) > 64, desc=desc)
        for at in range(0, len(order), batch_size):
            idx = order[at:at + batch_size]
            longest = max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx) - 1  # tokens read
            if longest > limit:
                raise ConfigError(f"a prompt with its label word is {longest + 1} tokens, more than the model's "
                                  f"{limit} (model.max_len) + 1: use fewer --shots or a shorter --template")
            width = min(_width(longest), limit)
            ids = np.full((batch_size, width), self.gen.m.pad_id, np.int32)
            targets = np.zeros((batch_size, width), np.int32)
            w = np.full((batch_size, width), -1.0, np.float32)
            for r, i in enumerate(idx):
                ctx, cont = pairs[i]
                if not ctx or not cont:
                    raise ConfigError(f"pair {i}: the context and the continuation need a token each "
                                      f"(got {len(ctx)} and {len(cont)})")
                row = ctx + cont
                ids[r, :len(row) - 1], targets[r, :len(row) - 1] = row[:-1], row[1:]
                w[r, :len(row) - 1] = 0.0
                w[r, len(ctx) - 1:len(row) - 1] = 1.0
            with S.activate(self.gen.mesh):
                got, ok = jax.device_get(self._fn(self.gen.params, ids, targets, w))
            for r, i in enumerate(idx):
                logp[i], greedy[i] = float(got[r]), bool(ok[r])
            bar.update(len(idx))
        bar.close()
        return logp, greedy


def _rows(cfg, split: str, limit: int | None):
    source = {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}[split]
    if not source:
        raise ConfigError(f"data.{split} is not set in the task config")
    return read_rows(source, split=split, text_field=cfg.data.text_field, hf_config=cfg.data.hf_config,
                     limit=limit)




def _fill(template: str, row, cfg) -> str:
    values = {"text": get_text(row, cfg.data.text_field)}
    if cfg.data.text_pair_field:
        values["text_pair"] = get_text(row, cfg.data.text_pair_field)
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--template {template!r}: {type(e).__name__}: {e} (fields: {', '.join(values)})") from e


def evaluate(gen, cfg, *, shots: int = 0, template: str = "{text}\nAnswer:", label_words=None,
             split: str = "validation", max_examples: int | None = None, seed: int = 0,
             batch_size: int = 8, scorer: Scorer | None = None) -> dict:
    """Accuracy, majority-label rate and prediction counts of ``gen`` on ``cfg``'s task.
    ``scorer``: a ``Scorer(gen)`` to reuse (its program is compiled once per row width)."""
    from jtl.data.tasks import LabelMap, field, infer_labels
    if gen.tokenizer is None:
        raise ConfigError(f"{gen.source}: no tokenizer to write prompts with")
    train = _rows(cfg, "train", None) if (shots or not cfg.data.labels) else []
    labels = infer_labels(train, cfg, "value")
    words = list(label_words) if label_words else list(labels)
    if len(words) != len(labels):
        raise ConfigError(f"--label-words has {len(words)} words for {len(labels)} labels ({', '.join(labels)})")
    rows = _rows(cfg, split, max_examples)
    label_map = LabelMap(labels, cfg.data.label_field)
    label_of = lambda row: label_map(field(row, cfg.data.label_field), row.where)
    demo = ""
    if shots:
        pick = np.random.default_rng(seed).choice(len(train), size=min(shots, len(train)), replace=False)
        demo = "".join(f"{_fill(template, train[i], cfg)} {words[label_of(train[i])]}\n\n" for i in pick)
    enc = lambda s: gen.tokenizer(s, add_special_tokens=False)["input_ids"]
    word_ids = [enc(" " + w) for w in words]
    if any(not w for w in word_ids):
        raise ConfigError(f"a label word tokenizes to nothing: {words}")
    pairs, gold = [], []
    for row in rows:
        ctx = enc(demo + _fill(template, row, cfg))
        pairs += [(ctx, w) for w in word_ids]
        gold.append(label_of(row))
    scores = np.array((scorer or Scorer(gen))(pairs, batch_size)).reshape(len(rows), len(words))
    pred = scores.argmax(1)
    counts = collections.Counter(labels[p] for p in pred)
    return {"shots": shots, "split": split, "examples": len(rows), "template": template,
            "label_words": words, "accuracy": float((pred == np.array(gold)).mean()),
            "majority_rate": max(counts.values()) / len(rows), "predicted": dict(counts),
            "gold": dict(collections.Counter(labels[g] for g in gold)), "scores": scores.tolist()}


def main(argv=None) -> int:
    from jtl import config as C
    from jtl.generate import load
    p = argparse.ArgumentParser(prog="jtl eval-prompted", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="jtl run dir, HF folder, .gguf file or hub name (a decoder)")
    p.add_argument("task", help="a task config (YAML or preset) naming data.train/validation and labels")
    p.add_argument("--shots", default="0", help="comma list of k (default 0)")
    p.add_argument("--template", default="{text}\nAnswer:", help="prompt with {text} (and {text_pair})")
    p.add_argument("--label-words", default=None, help="comma list, one per label (default: the labels)")
    p.add_argument("--split", default="validation", choices=("validation", "test", "train"))
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    try:
        shots = [int(x) for x in args.shots.split(",")]
    except ValueError:
        raise ConfigError(f"--shots {args.shots!r}: expected a comma list of integers, e.g. 0,4") from None
    words = args.label_words.split(",") if args.label_words else None
    cfg = C.load(args.task, [])
    gen = load(args.model)
    scorer, results = Scorer(gen), []
    for k in shots:
        r = evaluate(gen, cfg, shots=k, template=args.template.replace("\\n", "\n"), label_words=words,
                     split=args.split, max_examples=args.max_examples, seed=args.seed,
                     batch_size=args.batch_size, scorer=scorer)
        results.append(r)
        print(f"{k}-shot: accuracy {100 * r['accuracy']:.1f}% on {r['examples']} {args.split} examples; "
              f"most frequent prediction {100 * r['majority_rate']:.0f}% of the time; predicted "
              f"{r['predicted']} (gold {r['gold']})", flush=True)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "task": args.task,
                                   "results": [{k: v for k, v in r.items() if k != "scores"} for r in results]},
                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
