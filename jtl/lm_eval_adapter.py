"""The lm-evaluation-harness model ``jtl``: any decoder jtl loads, evaluated by lm_eval.

    jtl lm-eval --model_args run=RUN|WEIGHTS[,batch_size=8][,mesh.tensor=2] --tasks TASKS \\
        [--include_path local_tasks/] [any other lm_eval flag]
    python -m jtl.lm_eval_adapter ...        (the same)

lm_eval only knows the models registered when it starts, so both commands import this
module (which registers ``jtl``) and then run lm_eval's own command line (``--model jtl``
is added when no ``--model`` is given). From Python: ``lm_eval.simple_evaluate(
model=JtlLM(run=...), tasks=[...])``, or ``model="jtl"`` once this module is imported.

``model_args``: ``run`` (a jtl run dir, HF folder, ``.gguf`` file or hub name: whatever
``jtl.generate.load`` takes), ``batch_size`` (rows per jitted call; wins over
``--batch_size``), ``max_length`` (tokens the model reads; default ``model.max_len``),
``max_gen_toks`` (default 256), ``add_bos_token`` (default false, as lm_eval's ``hf``
model), ``seed`` (sampling), and dotted jtl config items (``mesh.tensor=2``,
``model.dtype=bfloat16``). ``--device`` is ignored: the mesh places the model.

How requests are answered, with jtl's own programs:

* ``loglikelihood`` / ``loglikelihood_rolling``: ``jtl.prompted.Scorer`` (one jitted
  forward over right-padded rows of power-of-two width). Text is split as lm_eval's ``hf``
  model splits it (``TemplateLM``: the context's trailing spaces join the continuation; an
  empty context is the BOS token, else EOS). A context longer than ``max_length`` is cut
  from the left; rolling log-likelihoods use lm_eval's disjoint windows of ``max_length``
  tokens, so a text longer than the model is scored whole.
* ``generate_until``: ``jtl.generate`` (KV cache, left-padded prompts), greedy unless
  ``do_sample``; ``until`` strings are cut from the text, the model's EOS ends a row,
  ``max_gen_toks`` caps it; the context keeps its last ``max_length - max_gen_toks`` tokens.

A row never sees another row's tokens or padding, so results do not depend on
``batch_size`` (tested).
"""
from __future__ import annotations

import json
import logging
import sys

import lm_eval.models  # noqa: F401 - lm_eval's own models stay available beside jtl
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from jtl.config import ConfigError

log = logging.getLogger("jtl")

_OWN_KEYS = ("run", "batch_size", "max_length", "max_gen_toks", "add_bos_token", "seed")


class JtlLM(TemplateLM):
    """lm_eval's ``LM`` over a ``jtl.generate.Generator`` (``run=`` loads one; tests may
    pass ``generator=``)."""

    def __init__(self, run: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool = False, seed: int = 0, generator=None,
                 device=None, max_batch_size=None, **config_items):
        super().__init__()
        from jtl.generate import load
        from jtl.prompted import Scorer
        bad = [k for k in config_items if "." not in k]
        if bad:
            raise ConfigError(f"model_args {bad[0]}={config_items[bad[0]]!r}: unknown; expected "
                              f"{', '.join(_OWN_KEYS)} or a jtl config item such as mesh.tensor=2")
        if (run is None) == (generator is None):
            raise ConfigError("model_args: give run=PATH (a jtl run dir, HF folder or .gguf file)")
        if generator is not None and config_items:
            raise ConfigError(f"model_args {next(iter(config_items))}: config items need run=PATH")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"model_args batch_size={batch_size!r}: expected a number (jtl does not "
                              f"search for a batch size)") from None
        if self.batch_size < 1:
            raise ConfigError(f"model_args batch_size={batch_size}: must be >= 1")
        self.gen = generator if generator is not None else load(
            run, overrides=[f"{k}={v}" for k, v in config_items.items()])
        if self.gen.tokenizer is None:
            raise ConfigError(f"{self.gen.source or 'model'}: no tokenizer: lm_eval requests are text")
        self.tokenizer = self.gen.tokenizer
        self._max_length = int(max_length or self.gen.m.max_len)
        self.max_gen_toks, self.add_bos_token, self.seed = int(max_gen_toks), bool(add_bos_token), int(seed)
        self.scorer = Scorer(self.gen)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # model_args win over the command line's defaults (lm_eval always passes batch_size)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # -- tokens --

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        eos = self.gen.eos_ids[0] if self.gen.eos_ids else self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"{self.gen.source or 'model'}: no EOS token to stand for an empty context")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.gen.source or "jtl").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=add)["input_ids"])

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.gen.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.gen.chat_template:
            raise ConfigError(f"{self.gen.source or 'model'}: --apply_chat_template: the tokenizer has no "
                              f"chat template")
        return self.tokenizer.apply_chat_template(chat_history, chat_template=self.gen.chat_template,
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)

    # -- requests --

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: ((context, continuation) or None, context ids, continuation ids)."""
        pairs, results = [], [(0.0, True)] * len(requests)
        for n, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise ConfigError(f"request {n}: a continuation of {len(cont)} tokens is longer than "
                                  f"max_length={self.max_length}")
            row = (ctx + cont)[-(self.max_length + 1):]  # the context loses its oldest tokens
            pairs.append((row[:len(row) - len(cont)], cont))
        todo = [n for n, (_, cont) in enumerate(pairs) if cont]  # an empty continuation: log 1 = 0
        logp, greedy = self.scorer.score([pairs[n] for n in todo], self.batch_size, desc="loglikelihood")
        for n, lp, g in zip(todo, logp, greedy):
            results[n] = (lp, g)
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_utils.make_disjoint_window(w)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one generate call per set of generation kwargs
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if n_new >= self.max_length:
                raise ConfigError(f"max_gen_toks={n_new} leaves no room for a context in "
                                  f"max_length={self.max_length} tokens")
            temperature = float(kw.pop("temperature", 1.0) or 0.0)
            if not kw.pop("do_sample", False):  # as lm_eval's hf model: greedy unless do_sample
                temperature = 0.0
            top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
            if kw:
                log.warning("lm_eval generation kwargs ignored by jtl: %s", sorted(kw))
            prompts = []
            for n in members:
                ids = self.tok_encode(requests[n].args[0]) or [self.prefix_token_id]
                prompts.append(ids[-(self.max_length - n_new):])
            done = self.gen.generate(prompts, max_new_tokens=n_new, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=self.seed, stop=until, batch_size=self.batch_size)
            for n, c in zip(members, done):
                out[n] = c.text
                self.cache_hook.add_partial("generate_until", requests[n].args, c.text)
        return out


if __name__ != "__main__":  # `python -m` runs this file as __main__, then imports it as jtl.lm_eval_adapter
    register_model("jtl")(JtlLM)


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with the ``jtl`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("ls", "validate", "-h", "--help") and not any(
            a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        at = 1 if argv[0] == "run" else 0
        argv[at:at] = ["--model", "jtl"]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from jtl.cli import main as jtl_main
    sys.exit(jtl_main(["lm-eval", *sys.argv[1:]]))
