"""Decoder generation: a KV cache, one jitted prefill and one jitted decode loop.

``generate(source, prompts, ...)`` takes a jtl run directory, a Hugging Face folder,
a ``.gguf`` file or hub name (loaded by the same code as ``model.init_from``), an
already loaded ``Generator`` or a training ``Setup``; prompts are strings, token-id
lists or chat ``messages`` lists.

How a batch is run, in fixed shapes:

* prompts are **left-padded** to a power-of-two bucket P (at least 16), so every
  row's last prompt token sits in slot P-1 and all rows write their next token into
  the same cache slot; row b's real tokens start at slot ``start[b]``; positions
  (RoPE or learned) count from there, and the pad slots are masked out as keys;
* the cache has T = P + max_new_tokens slots per layer (one [B, kv_heads, T, head_dim]
  buffer per layer, sharded like activations: batch over data x fsdp, kv heads over
  tensor); the prefill writes slots 0..P-1 and samples the first new token;
* the decode program is one ``lax.while_loop`` that feeds one token per step; how
  many steps it may take is an argument, so the same compiled program runs the whole
  completion at once, or a few steps at a time when stop strings are checked on the
  host, or one step at a time when streaming. It ends early when every row is done.

Compiled programs: one prefill per (batch, bucket, max_new_tokens), one decode loop
per (batch, cache length), each in up to three variants: greedy, sampling, and
sampling with top-k/top-p filtering (temperature, k and p are values, not constants).
Sampling draws each row from its own key (seed, row number, step), so a row's
tokens do not depend on which other prompts share its batch.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.models import layers as L
from jtl.models.transformer import CACHE, decode_layers, uses_rope

log = logging.getLogger("jtl.generate")

MIN_BUCKET = 16

__all__ = ["generate", "load", "Generator", "Completion", "Sampling", "generate_file", "bucket"]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 = off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

    @property
    def static(self) -> tuple:
        """What changes the compiled program: (greedy, top-k/top-p filtering on)."""
        greedy = self.temperature == 0.0
        return greedy, (not greedy) and (self.top_k > 0 or self.top_p < 1.0)


@dataclass
class Completion:
    tokens: list[int]  # the new tokens (the EOS token included when it ended the row)
    text: str | None  # decoded without special tokens, cut before a stop string; None without a tokenizer
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int


def bucket(n: int) -> int:
    """Prompt slots for a prompt of n tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


# ------------------------------------------------------------------ device programs


def _sample(logits_BV, key, row_ids_B, step, temperature, top_k, top_p, *, greedy: bool, filtered: bool):
    logits = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if filtered:
        # top-k, then the smallest set of the most likely tokens whose probability reaches
        # top_p (as transformers orders them). k and p are values, not program constants.
        v = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        desc = jnp.sort(logits, -1)[:, ::-1]
        in_k = jnp.arange(v) < k
        probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), -1)
        keep = in_k & ((jnp.cumsum(probs, -1) - probs) < top_p)  # the most likely is always kept
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(row_ids_B)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


class Generator:
    """A decoder ready to generate: model config, sharded params, mesh, tokenizer and the
    jitted prefill/decode programs (one pair per Generator, i.e. per mesh and rules)."""

    def __init__(self, cfg: Config, graphdef, params, mesh, tokenizer=None, eos_ids: Sequence[int] = (),
                 chat_template: str | None = None, source: str | None = None):
        if not cfg.model.causal:
            raise ConfigError(f"{source or 'model'}: model.family={cfg.model.family!r} is an encoder; "
                              f"generation needs a decoder (gpt2, llama)")
        self.cfg, self.m, self.graphdef, self.params, self.mesh = cfg, cfg.model, graphdef, params, mesh
        self.tokenizer, self.eos_ids, self.source = tokenizer, tuple(int(e) for e in eos_ids), source
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        model = nnx.merge(graphdef, params)
        if not hasattr(model, "lm_w") and not cfg.model.tie_embeddings:
            raise ConfigError(f"{source or 'model'}: has no LM head (task.kind={cfg.task.kind}, untied "
                              f"embeddings): nothing to generate tokens with")
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("n_new", "cache_len", "static"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("static",), donate_argnums=(2,))
        self._split = jax.jit(lambda params: decode_layers(cfg.model, nnx.merge(graphdef, params)
                                                           .backbone.layers.arrays()))
        self._layers_of = (None, None)  # (params, their per-layer split)

    def layers(self):
        """The layer params split per layer for the decode loop (``transformer.decode_layers``),
        made once per ``self.params`` (a second copy of the layer weights): the loop then
        reads each weight in place instead of slicing the stack at every token."""
        if self._layers_of[0] is not self.params:
            with S.activate(self.mesh):
                self._layers_of = (self.params, self._split(self.params))
        return self._layers_of[1]

    # -- programs (traced under the mesh and rules) --

    def _logits(self, model, h_BD):
        return L.dense(h_BD, model.output_matrix(), None, h_BD.dtype).astype(jnp.float32)

    def _prefill_fn(self, params, layers, ids_BP, start_B, row_ids_B, live_B, key, eos_E, knobs, *,
                    n_new: int, cache_len: int, static):
        m = self.m
        model = nnx.merge(self.graphdef, params)
        b, p = ids_BP.shape
        shape = (b, m.num_kv_heads, cache_len, m.dim_per_head)
        cache = {n: [S.constrain(jnp.zeros(shape, jnp.dtype(m.dtype)), CACHE) for _ in range(m.layers)]
                 for n in ("k", "v")}
        positions = jnp.maximum(jnp.arange(p)[None] - start_B[:, None], 0)
        mask = L.cache_mask(start_B, 0, p, cache_len)
        h, cache = model.backbone.decode(m, ids_BP, positions, mask, cache, 0, layers)
        tok = self._pick(model, h[:, -1], key, row_ids_B, 0, knobs, static)
        tokens = jnp.full((b, n_new), m.pad_id, jnp.int32).at[:, 0].set(tok)
        return dict(cache=cache, tokens=S.constrain(tokens, ("batch", None)), last=tok,
                    index=jnp.int32(p), step=jnp.int32(1), done=~live_B | jnp.isin(tok, eos_E),
                    lengths=jnp.ones((b,), jnp.int32), start=start_B, row_ids=row_ids_B)

    def _pick(self, model, h_BD, key, row_ids_B, step, knobs, static):
        greedy, filtered = static
        temperature, top_k, top_p = knobs
        return _sample(self._logits(model, h_BD), key, row_ids_B, step, temperature, top_k, top_p,
                       greedy=greedy, filtered=filtered)

    def _decode_fn(self, params, layers, state, n_steps, key, eos_E, knobs, *, static):
        m = self.m
        model = nnx.merge(self.graphdef, params)
        n_new, t = state["tokens"].shape[1], state["cache"]["k"][0].shape[2]
        stop_at = jnp.minimum(state["step"] + n_steps, n_new)

        def cond(s):
            return (s["step"] < stop_at) & ~jnp.all(s["done"])

        def body(s):
            idx = s["index"]
            positions = (idx - s["start"])[:, None]
            mask = L.cache_mask(s["start"], idx, 1, t)
            h, cache = model.backbone.decode(m, s["last"][:, None], positions, mask, s["cache"], idx, layers)
            tok = self._pick(model, h[:, 0], key, s["row_ids"], s["step"], knobs, static)
            tok = jnp.where(s["done"], m.pad_id, tok)
            tokens = jax.lax.dynamic_update_slice_in_dim(s["tokens"], tok[:, None], s["step"], axis=1)
            return dict(s, cache=cache, tokens=tokens, last=tok, index=idx + 1, step=s["step"] + 1,
                        lengths=s["lengths"] + (~s["done"]).astype(jnp.int32),
                        done=s["done"] | jnp.isin(tok, eos_E))

        return jax.lax.while_loop(cond, body, state)

    # -- host side --

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text for chat ``messages`` through the tokenizer's chat template."""
        if not self.chat_template:
            raise ConfigError(f"{self.source or 'model'}: the tokenizer has no chat template "
                              f"(tokenizer_config.json chat_template / GGUF tokenizer.chat_template)")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of one prompt: ids as given, a string (``chat``: as a user turn), or messages."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise ConfigError(f"{self.source or 'model'}: no tokenizer; give prompts as token-id lists")
        if isinstance(prompt, str) and not chat:
            return list(self.tokenizer(prompt)["input_ids"])
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = self.chat_prompt(messages)
        # The template writes the special tokens (BOS, turn markers) itself.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, ids: Sequence[int], max_new_tokens: int, where: str) -> None:
        if not ids:
            raise ConfigError(f"{where}: empty (no tokens)")
        if not uses_rope(self.m) and len(ids) + max_new_tokens > self.m.max_len:
            raise ConfigError(f"{where}: {len(ids)} tokens + max_new_tokens={max_new_tokens} exceed "
                              f"the model's {self.m.max_len} learned positions")
        bad = [t for t in ids if not 0 <= t < self.m.vocab_size]
        if bad:
            raise ConfigError(f"{where}: token id {bad[0]} is outside the vocabulary "
                              f"(model.vocab_size={self.m.vocab_size})")

    def decode_text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 eos: int | Sequence[int] | None = None, chat: bool = False, batch_size: int | None = None,
                 check_every: int = 16, on_text: Callable[[int, str], None] | None = None,
                 row_ids: Sequence[int] | None = None) -> list[Completion]:
        """One ``Completion`` per prompt (in order). ``eos=None``: the model's EOS ids; ``[]``:
        none. ``stop`` strings are checked on the host every ``check_every`` tokens (every
        token with ``on_text``, which gets (prompt index, new text) as it is produced)."""
        sampling = Sampling(float(temperature), int(top_k), float(top_p))
        sampling.check()
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        if (stop or on_text) and self.tokenizer is None:
            raise ConfigError("stop strings and streaming need a tokenizer")
        eos_ids = self.eos_ids if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode(p, chat) for p in prompts]
        row_ids = list(range(len(ids))) if row_ids is None else list(row_ids)
        for i, x in enumerate(ids):
            self.check_prompt(x, max_new_tokens, f"prompt {i}")
        div = S.batch_divisor(self.mesh)
        bs = min(batch_size or len(ids), len(ids))
        bs = math.ceil(bs / div) * div  # rows fill the mesh's batch axes (filler rows are dropped)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[Completion | None] = [None] * len(ids)
        for at in range(0, len(order), bs):
            chunk = order[at:at + bs]
            results = self._run_batch([ids[i] for i in chunk], [row_ids[i] for i in chunk], bs,
                                      max_new_tokens, sampling, seed, stop, eos_ids, check_every,
                                      None if on_text is None else (lambda j, s, c=chunk: on_text(c[j], s)))
            for i, r in zip(chunk, results):
                out[i] = r
        return out

    def _run_batch(self, ids, row_ids, bs, n_new, sampling, seed, stop, eos_ids, check_every, on_text):
        n = len(ids)
        p = bucket(max(len(x) for x in ids))
        rows = ids + [ids[0]] * (bs - n)  # filler rows keep the batch shape; discarded
        arr = np.full((bs, p), self.m.pad_id, np.int32)
        start = np.zeros((bs,), np.int32)
        for r, x in enumerate(rows):
            arr[r, p - len(x):] = x
            start[r] = p - len(x)
        rid = np.asarray(list(row_ids) + [0] * (bs - n), np.int32)
        live = np.arange(bs) < n  # filler rows start done: they never keep the loop going
        put = lambda a: jax.device_put(a, S.batch_sharding(self.mesh, a.ndim))
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        key = jax.device_put(jax.random.key(seed), repl)
        eos_arr = jax.device_put(np.asarray(eos_ids or [-1], np.int32), repl)
        knobs = (np.float32(sampling.temperature or 1.0), np.int32(sampling.top_k), np.float32(sampling.top_p))
        static = sampling.static
        with S.activate(self.mesh):
            state = self._prefill(self.params, self.layers(), put(arr), put(start), put(rid), put(live), key,
                                  eos_arr, knobs, n_new=n_new, cache_len=p + n_new, static=static)
            stream = on_text is not None
            step_n = 1 if stream else (check_every if stop else n_new)
            shown = [""] * n
            stopped = np.zeros((bs,), bool)
            hold = max((len(s) for s in stop), default=1) - 1  # text that may become a stop string
            while True:
                if stop or stream:
                    tokens, lengths, done = jax.device_get((state["tokens"], state["lengths"], state["done"]))
                    for r in range(n):
                        if stopped[r]:
                            continue
                        text = self.decode_text(tokens[r, :lengths[r]])
                        cut = _find_stop(text, stop)
                        if cut is not None:
                            stopped[r] = True
                        finished = bool(done[r]) or cut is not None or int(lengths[r]) >= n_new
                        if stream:  # hold back what may still turn into a stop string
                            visible = (text[:cut] if cut is not None else
                                       text if finished or not hold else text[:-hold])
                            if len(visible) > len(shown[r]) and visible.startswith(shown[r]):
                                on_text(r, visible[len(shown[r]):])
                                shown[r] = visible
                    if stopped.any():
                        state["done"] = state["done"] | put(stopped)
                    if bool(np.all(done[:n] | stopped[:n])):
                        break
                if int(jax.device_get(state["step"])) >= n_new:
                    break
                state = self._decode(self.params, self.layers(), state, np.int32(step_n), key, eos_arr,
                                     knobs, static=static)
                if not (stop or stream) and bool(np.all(jax.device_get(state["done"])[:n])):
                    break
            tokens, lengths = jax.device_get((state["tokens"], state["lengths"]))
        out = []
        for r in range(n):
            toks = [int(t) for t in tokens[r, :lengths[r]]]
            reason = "eos" if toks and toks[-1] in eos_ids else "length"
            text = None
            if self.tokenizer is not None:
                text = self.decode_text(toks)
                cut = _find_stop(text, stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    toks = _tokens_until_stop(self, toks, stop)
            out.append(Completion(toks, text, reason, len(ids[r])))
        return out


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _tokens_until_stop(gen: Generator, toks: list[int], stop) -> list[int]:
    """The shortest prefix of ``toks`` whose text contains a stop string."""
    for k in range(1, len(toks) + 1):
        if _find_stop(gen.decode_text(toks[:k]), stop) is not None:
            return toks[:k]
    return toks


# ------------------------------------------------------------------ loading


def _mesh(cfg: Config, mesh):
    if mesh is None:
        return S.make_mesh(cfg.mesh)
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    return S.make_mesh(tuple(mesh))


def _abstract_model(cfg: Config, mesh):
    from jtl.models import Model
    from jtl.tasks import get as get_task
    num_labels = get_task(cfg.task.kind).num_labels(cfg)
    with S.activate(mesh):
        return nnx.split(nnx.eval_shape(lambda: Model(cfg.model, cfg.task.kind, num_labels,
                                                      pooling=cfg.task.pooling, rngs=nnx.Rngs(0))))


def _fill(graphdef, abstract, loaded: dict, where: str):
    """Put the loaded arrays into the abstract state; backbone or LM-head params the source
    lacks are an error, other heads (a classifier's) are zeros: generation never reads them."""
    from jtl.convert.hf import concrete_sharding
    from jtl.weights import WeightsError
    missing = [".".join(map(str, p)) for p, _ in abstract.flat_state()
               if p not in loaded and str(p[0]) in ("backbone", "lm_w")]
    if missing:
        raise WeightsError(f"{where}: no weights for {', '.join(missing[:4])}"
                           + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    for path, var in abstract.flat_state():
        if path in loaded:
            arr = loaded[path]
            var.set_value(arr if arr.dtype == var.dtype else arr.astype(var.dtype))
        else:
            var.set_value(jax.device_put(jnp.zeros(var.shape, var.dtype), concrete_sharding(var.sharding)))
    return abstract


def _eos_from_folder(folder: Path, tok) -> list[int]:
    ids = []
    if tok is not None and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.is_file():
        try:
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            e = None
        ids += [int(x) for x in (e if isinstance(e, list) else [e]) if x is not None]
    return list(dict.fromkeys(ids))


def load(source, *, mesh=None, overrides: Iterable[str] = ()) -> Generator:
    """A ``Generator`` from a jtl run dir (its best, else latest, step), an HF folder, a
    ``.gguf`` file or a hub name. ``overrides`` are ``key=value`` config items
    (``mesh.tensor=2``, ``model.dtype=bfloat16``); ``mesh`` (a Mesh or a
    (data, fsdp, tensor) tuple) wins over ``mesh.*``."""
    from jtl import config as C
    from jtl.data.tokenizer import load_tokenizer
    from jtl.weights import _kind, load_hf_tokenizer_dir, local_path, params_loader, resolve_config
    overrides = list(overrides)
    path = local_path(str(source))
    kind = _kind(path)
    template = None
    if kind == "jtl":
        from jtl.checkpoint import restore_params
        cfg = C.load(str(path / "config.yaml"), overrides)
        cfg = cfg.replace(**{"run_dir": str(path), "model.init_from": None})
        tok = load_tokenizer(str(path / "tokenizer")) if (path / "tokenizer").is_dir() else None
        step = None
        if (path / "summary.json").is_file():
            step = json.loads((path / "summary.json").read_text()).get("best_step")
        mesh = _mesh(cfg, mesh)
        S.check_model_fits(cfg.model, mesh)
        graphdef, abstract = _abstract_model(cfg, mesh)
        with S.activate(mesh):
            loaded = restore_params(path, abstract, step=step)
        eos = _eos_from_folder(path / "tokenizer", tok)
    else:
        cfg = C.load(None, ["task.kind=clm", "model.family=llama", "data.seq_len=2", "model.dropout=0.0",
                            "model.attention_dropout=0.0", *overrides, f"model.init_from={source}"])
        cfg = resolve_config(cfg)
        mesh = _mesh(cfg, mesh)
        S.check_model_fits(cfg.model, mesh)
        graphdef, abstract = _abstract_model(cfg, mesh)
        with S.activate(mesh):
            loaded = params_loader(cfg)(abstract)
        tok_dir = load_hf_tokenizer_dir(str(source))
        tok = load_tokenizer(tok_dir) if tok_dir else None
        if kind == "gguf":
            from jtl.convert.sources import gguf_metadata
            meta, _ = gguf_metadata(path)
            template = meta.get("tokenizer.chat_template")
            eos = [int(meta["tokenizer.ggml.eos_token_id"])] if "tokenizer.ggml.eos_token_id" in meta else []
            if tok is not None and tok.eos_token_id is not None:
                eos = list(dict.fromkeys(eos + [int(tok.eos_token_id)]))
        else:
            eos = _eos_from_folder(path, tok)
    if tok is not None and len(tok) > cfg.model.vocab_size:
        raise ConfigError(f"{source}: the tokenizer has {len(tok)} tokens but the model only "
                          f"{cfg.model.vocab_size}")
    params = _fill(graphdef, abstract, loaded, str(source))
    return Generator(cfg, graphdef, params, mesh, tok, eos, template, str(source))


def from_setup(setup, tokenizer=None, eos_ids: Sequence[int] = ()) -> Generator:
    """A ``Generator`` on a training ``Setup``'s current parameters and mesh."""
    model = setup.model()
    graphdef, params = nnx.split(model)
    if eos_ids == () and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids = (tokenizer.eos_token_id,)
    return Generator(setup.cfg, graphdef, params, setup.mesh, tokenizer, eos_ids)


def generate(source, prompts: Sequence, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
             eos: int | Sequence[int] | None = None, chat: bool = False, mesh=None,
             batch_size: int | None = None, tokenizer=None, **kw) -> list[Completion]:
    """Complete ``prompts`` (strings, token-id lists or chat message lists) with the model
    ``source``: a ``Generator``, a training ``Setup``, or a path/hub name for ``load``.
    Greedy unless ``temperature`` > 0."""
    if isinstance(source, Generator):
        gen = source
    elif hasattr(source, "graphdef") and hasattr(source, "state"):
        gen = from_setup(source, tokenizer)
    else:
        gen = load(source, mesh=mesh)
    return gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop, eos=eos, chat=chat, batch_size=batch_size, **kw)


# ------------------------------------------------------------------ files (jtl generate --input)


def read_prompts(path) -> list[dict]:
    """JSONL rows, each an object with a ``prompt`` string or chat ``messages``
    ([{"role", "content"}, ...]); a bad row is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--input {p}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{p}:{n}: expected a JSON object with a \"prompt\" or \"messages\" field, "
                              f"got {type(row).__name__}")
        if "messages" in row:
            msgs = row["messages"]
            if not (isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise ConfigError(f"{p}:{n}: \"messages\" must be a non-empty list of "
                                  f"{{\"role\": str, \"content\": str}} objects")
        elif not isinstance(row.get("prompt"), str) or not row["prompt"]:
            what = "missing" if "prompt" not in row else f"a {type(row['prompt']).__name__}, not a non-empty string"
            raise ConfigError(f"{p}:{n}: \"prompt\" is {what} (each row needs a \"prompt\" string "
                              f"or chat \"messages\")")
        rows.append((n, row))
    if not rows:
        raise ConfigError(f"{p}: no rows")
    return rows


def generate_file(gen: Generator, input_path, output_path, *, chat: bool = False, chunk_rows: int = 256,
                  **kw) -> int:
    """``jtl generate ... --input in.jsonl --output out.jsonl``: every input row with a
    ``completion`` added, in input order; written to a temporary file and renamed, so a
    failure leaves no partial output (and an old output intact)."""
    out = Path(output_path)
    if out.exists() and out.resolve() == Path(input_path).resolve():
        raise ConfigError(f"--output {out} is the input file: refusing to overwrite it")
    rows = read_prompts(input_path)
    prompts = []
    for n, row in rows:  # tokenize (and template) and check every row before generating anything
        try:
            prompts.append(gen.encode(row["messages"] if "messages" in row else row["prompt"],
                                      chat or "messages" in row))
        except ConfigError as e:
            raise ConfigError(f"{input_path}:{n}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template error names the row
            raise ConfigError(f"{input_path}:{n}: could not build the prompt ({type(e).__name__}: {e})") from None
        gen.check_prompt(prompts[-1], kw.get("max_new_tokens", 64), f"{input_path}:{n}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for at in range(0, len(rows), chunk_rows):
                part = list(range(at, min(at + chunk_rows, len(rows))))
                done = gen.generate([prompts[i] for i in part], row_ids=[rows[i][0] for i in part], **kw)
                for i, c in zip(part, done):
                    f.write(json.dumps({**rows[i][1], "completion": c.text if c.text is not None else c.tokens},
                                       ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)
