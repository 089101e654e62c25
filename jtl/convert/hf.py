"""Hugging Face / GGUF checkpoints <-> jtl parameters, driven by ``tables.py``.

Import streams every parameter straight into its target sharding: the callback
of ``jax.make_array_from_callback`` for one device reads only that device's
slice (and only the layers in it) from disk, so the host never holds the whole
checkpoint. Export gathers each parameter and writes one ``model.safetensors``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from pathlib import Path

import jax
import numpy as np

from jtl.config import ModelConfig
from jtl.convert import tables as T
from jtl.convert.sources import WeightsError

log = logging.getLogger("jtl.weights")

FAMILIES = ("bert", "roberta", "gpt2", "llama")
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}


# ------------------------------------------------------------------ config


def model_fields_from_hf(hf: dict, where: str) -> dict:
    """jtl ModelConfig fields from a HF config.json dict (``where`` names the file)."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise WeightsError(f"{where}: model_type={mt!r} is not supported; supported families: "
                           f"{', '.join(FAMILIES)} (MiniLM, SmolLM2 and TinyLlama use bert/llama)")
    get = lambda *names, default=None: next((hf[n] for n in names if hf.get(n) is not None), default)
    act_name = get("hidden_act", "activation_function", default="gelu")
    if act_name not in ACT_FROM_HF:
        raise WeightsError(f"{where}: activation {act_name!r} is not supported "
                           f"(known: {', '.join(ACT_FROM_HF)})")
    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    out = dict(family=mt, vocab_size=get("vocab_size"), hidden=hidden,
               layers=get("num_hidden_layers", "n_layer"), heads=heads,
               activation=ACT_FROM_HF[act_name],
               tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if mt in ("bert", "roberta"):
        out.update(mlp=get("intermediate_size"), max_len=get("max_position_embeddings"),
                   type_vocab=get("type_vocab_size", default=2), norm_eps=get("layer_norm_eps", default=1e-12),
                   pad_id=get("pad_token_id", default=0), kv_heads=None, head_dim=None)
        out["position_offset"] = out["pad_id"] + 1 if mt == "roberta" else 0
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise WeightsError(f"{where}: position_embedding_type="
                               f"{hf['position_embedding_type']!r} is not supported (only 'absolute')")
    elif mt == "gpt2":
        out.update(mlp=get("n_inner", default=4 * hidden), max_len=get("n_positions"), type_vocab=0,
                   norm_eps=get("layer_norm_epsilon", default=1e-5), kv_heads=None, head_dim=None,
                   pad_id=get("pad_token_id", "eos_token_id", default=0), position_offset=0)
    else:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", None):
            raise WeightsError(f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE: "
                               f"Llama 2/3, SmolLM2, TinyLlama)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise WeightsError(f"{where}: attention_bias/mlp_bias=true is not supported for llama")
        out.update(mlp=get("intermediate_size"), max_len=get("max_position_embeddings", default=2048),
                   type_vocab=0, norm_eps=get("rms_norm_eps", default=1e-6),
                   kv_heads=get("num_key_value_heads", default=heads),
                   head_dim=get("head_dim", default=hidden // heads),
                   rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                   pad_id=get("pad_token_id", "eos_token_id", default=0), position_offset=0)
    if isinstance(out["pad_id"], list):  # eos_token_id may list several ids
        out["pad_id"] = out["pad_id"][0]
    missing = [k for k, v in out.items() if v is None and k not in ("kv_heads", "head_dim")]
    if missing:
        raise WeightsError(f"{where}: missing fields for {', '.join(missing)}")
    return out


def model_fields_from_gguf(meta: dict, where: str) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{where}: GGUF architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    need = [f"llama.{k}" for k in ("attention.head_count", "embedding_length", "block_count",
                                   "feed_forward_length") if g(k) is None]
    if need:
        raise WeightsError(f"{where}: GGUF metadata lacks {', '.join(need)}")
    if g("rope.scaling.type", "none") not in ("none", None) or meta.get("_has_rope_freqs"):
        raise WeightsError(f"{where}: RoPE scaling ({g('rope.scaling.type', 'rope_freqs')}) is not "
                           f"supported (only plain RoPE)")
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or meta.get("tokenizer.ggml.tokens.count")
    return dict(family="llama", vocab_size=int(vocab), hidden=hidden, layers=int(g("block_count")),
                heads=heads, kv_heads=int(g("attention.head_count_kv", heads)),
                head_dim=int(g("attention.key_length", hidden // heads)), mlp=int(g("feed_forward_length")),
                max_len=int(g("context_length", 2048)), type_vocab=0, activation="silu",
                norm_eps=float(f"{g('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),  # f32 in the file
                rope_theta=float(g("rope.freq_base", 10000.0)), tie_embeddings=meta.get("_has_output") is False,
                pad_id=int(meta.get("tokenizer.ggml.padding_token_id", meta.get("tokenizer.ggml.eos_token_id", 0))),
                position_offset=0)


# ------------------------------------------------------------------ import


def _detect_prefix(keys, family: str, where: str) -> str:
    tokens_key = T.BACKBONE[family]["embed.tokens"][0]
    found = sorted((k[: -len(tokens_key)] for k in keys if k.endswith(tokens_key)
                    and (k == tokens_key or k[: -len(tokens_key)].endswith("."))), key=len)
    if not found:
        sample = ", ".join(sorted(keys)[:4])
        raise WeightsError(f"{where}: no {family} weights found (expected a key like "
                           f"{T.PREFIXES[family] + tokens_key!r}; the checkpoint has e.g. {sample}); "
                           f"is model.family right?")
    return found[0]


def load_params(model_cfg: ModelConfig, task: str, source, abstract_params) -> dict:
    """{path tuple: jax.Array in the abstract leaf's sharding} for every parameter the
    checkpoint has; heads it lacks are logged as newly initialized. All problems
    (missing, unexpected, wrong shape) are raised together in one WeightsError."""
    family, n_layers = model_cfg.family, model_cfg.layers
    dims = {"H": model_cfg.heads, "KV": model_cfg.num_kv_heads}
    table = T.rules(family, task)
    keys = set(source.keys())
    prefix = _detect_prefix(keys, family, source.name)
    resolve = lambda k, i=None: (k[1:] if k.startswith("^") else prefix + k).format(i=i)

    problems, fresh, plan = [], [], {}
    for path, var in abstract_params.flat_state():
        spath = tuple(map(str, path))
        name, head = ".".join(spath), spath[0] != "backbone"
        target = tuple(var.shape)
        rule = table.get(spath)
        if rule is None:
            (fresh if head else problems).append(name if head else f"{name}: no {family} rule")
            continue
        templates, ops = rule
        stacked = "{i}" in templates[0]
        chosen, missing = [], []
        for i in range(n_layers) if stacked else [None]:
            cands = [resolve(t, i) for t in templates]
            hit = next((c for c in cands if c in keys), None)
            chosen.append(hit)
            if hit is None:
                missing.append(cands[0])
        per = target[1:] if stacked else target
        bad = [(k, tuple(source.shape(k))) for k in chosen
               if k is not None and T.converted_shape(source.shape(k), ops, dims) != per]
        if head and (missing or bad):
            fresh.append(name + (f" (checkpoint shape {bad[0][1]} does not fit {per})" if bad else ""))
            continue
        if missing:
            more = f" (+{len(missing) - 2} more)" if len(missing) > 2 else ""
            problems.append(f"missing {name} {target}: no {', '.join(missing[:2])}{more}")
        if bad:
            k, s = bad[0]
            msg = (f"shape {name}: checkpoint {k} {s} -> {T.converted_shape(s, ops, dims)}, "
                   f"model expects {per}")
            if spath == ("backbone", "embed", "tokens"):
                if s[0] != per[0]:
                    msg += f" (vocab size: checkpoint {s[0]}, model.vocab_size={model_cfg.vocab_size})"
                if s[1] != per[1]:
                    msg += f" (width: checkpoint {s[1]}, model.hidden={model_cfg.hidden})"
                    problems.insert(0, f"the checkpoint's tensors are {s[1]} wide but the model is "
                                       f"{model_cfg.hidden} wide")
            problems.append(msg)
        if missing or bad:
            continue
        plan[path] = (var, chosen, ops, stacked)

    known = {resolve(k, i) for k in T.known_keys(family)
             for i in (range(n_layers) if "{i}" in k else [None])}
    unexpected = sorted(k for k in keys if k.startswith(prefix) and k not in known
                        and not T.IGNORED.search(k))
    problems += [f"unexpected {k} {tuple(source.shape(k))}" for k in unexpected]
    if problems:
        raise WeightsError(
            f"{source.name} does not fit model.family={family} layers={n_layers} "
            f"hidden={model_cfg.hidden} heads={model_cfg.heads} kv_heads={model_cfg.num_kv_heads} "
            f"({len(problems)} problems). With model.init_from these sizes come from the source's own "
            f"config (config.json / GGUF metadata): if you did not set them, that config disagrees "
            f"with its tensors:\n  " + "\n  ".join(problems))
    used = {k for _, chosen, _, _ in plan.values() for k in chosen}
    unused = sorted(k for k in keys - used if not T.IGNORED.search(k))
    if unused:
        log.info("not used from %s: %s", source.name, ", ".join(unused))
    if fresh:
        log.warning("newly initialized (not in %s): %s", source.name, ", ".join(fresh))

    out = {}
    for path, (var, chosen, ops, stacked) in plan.items():
        out[path] = _make_array(source, var, chosen, ops, stacked, dims)
        getattr(source, "release", lambda: None)()
    log.info("loaded %d parameters (%s values) from %s", len(out),
             f"{sum(math.prod(a.shape) for a in out.values()):,}", source.name)
    return out


def concrete_sharding(sharding):
    """Abstract params carry shardings over an AbstractMesh; arrays need real devices.

    Uses the active mesh when there is one, else rebuilds the mesh the way
    ``sharding.make_mesh`` does (same axes, first N devices, same order)."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return sharding
    active = jax.sharding.get_mesh()
    if isinstance(active, jax.sharding.Mesh) and not active.empty and \
            active.axis_names == mesh.axis_names and active.axis_sizes == mesh.axis_sizes:
        real = active
    else:
        real = _mesh_like(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
    return jax.sharding.NamedSharding(real, sharding.spec)


@functools.lru_cache(maxsize=4)
def _mesh_like(names, sizes, types):
    return jax.make_mesh(sizes, names, axis_types=types, devices=jax.devices()[: math.prod(sizes)])


def _make_array(source, var, chosen, ops, stacked, dims):
    shape, dtype = tuple(var.shape), np.dtype(var.dtype)

    def read(key, region_out):
        return T.read_region(source.read, key, source.shape(key), ops, dims, region_out)

    def callback(index):
        region = [s.indices(n)[:2] for s, n in zip(index, shape)]
        if stacked:
            (l0, l1), rest = region[0], region[1:]
            x = np.stack([read(chosen[i], rest) for i in range(l0, l1)])
        else:
            x = read(chosen[0], region)
        return np.ascontiguousarray(x.astype(dtype, copy=False))

    try:
        return jax.make_array_from_callback(shape, concrete_sharding(var.sharding), callback)
    except WeightsError:
        raise
    except Exception as e:  # name the parameter and file on any read failure
        raise WeightsError(f"{source.file(chosen[0])}: reading {chosen[0]}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ export


def hf_config(m: ModelConfig, arch: str, labels=None, problem_type=None) -> dict:
    """config.json for ``transformers`` from a jtl ModelConfig."""
    f = m.family
    if f != "llama" and (m.num_kv_heads != m.heads or m.dim_per_head * m.heads != m.hidden):
        raise WeightsError(f"model.family={f} in transformers needs kv_heads = heads and "
                           f"head_dim = hidden / heads")
    if f == "roberta" and m.position_offset != m.pad_id + 1:
        raise WeightsError(f"RoBERTa in transformers numbers positions from pad_token_id + 1; "
                           f"model.position_offset={m.position_offset} with model.pad_id={m.pad_id}")
    if f in ("bert", "gpt2") and m.position_offset:
        raise WeightsError(f"model.position_offset={m.position_offset} cannot be exported for {f}")
    common = dict(architectures=[arch], model_type=f, vocab_size=m.vocab_size,
                  tie_word_embeddings=m.tie_embeddings, dtype="float32")
    if f in ("bert", "roberta"):
        cfg = dict(hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.heads,
                   intermediate_size=m.mlp, hidden_act=ACT_TO_HF[m.activation],
                   max_position_embeddings=m.max_len, type_vocab_size=max(m.type_vocab, 1),
                   layer_norm_eps=m.norm_eps, pad_token_id=m.pad_id, hidden_dropout_prob=m.dropout,
                   attention_probs_dropout_prob=m.attention_dropout, initializer_range=m.init_std,
                   position_embedding_type="absolute")
    elif f == "gpt2":
        cfg = dict(n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.mlp,
                   n_positions=m.max_len, activation_function=ACT_TO_HF[m.activation],
                   layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
                   attn_pdrop=m.attention_dropout, initializer_range=m.init_std)
    else:
        cfg = dict(hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.heads,
                   num_key_value_heads=m.num_kv_heads, head_dim=m.dim_per_head,
                   intermediate_size=m.mlp, hidden_act=ACT_TO_HF[m.activation],
                   max_position_embeddings=m.max_len, rms_norm_eps=m.norm_eps,
                   rope_theta=m.rope_theta,
                   rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                   attention_bias=False, mlp_bias=False, pad_token_id=m.pad_id,
                   attention_dropout=m.attention_dropout, initializer_range=m.init_std)
    cfg.update(common)
    if labels is not None:
        cfg["id2label"] = {str(i): str(l) for i, l in enumerate(labels)}
        cfg["label2id"] = {str(l): i for i, l in enumerate(labels)}
    if problem_type:
        cfg["problem_type"] = problem_type
    return cfg


def _infer_task(m: ModelConfig, flat: dict) -> str | None:
    if ("mlm_w",) in flat:
        return "mlm"
    if m.causal:
        return "clm"
    return None


def export_hf(m: ModelConfig, flat: dict, out_dir, tokenizer_dir=None, *, task: str | None = None,
              pooling: str = "pooler", labels=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) loadable by transformers.

    ``flat`` maps jtl path tuples (strings) to arrays. Heads that transformers
    cannot express (e.g. mean pooling) are left out: the export is then the base model."""
    from safetensors.numpy import save_file
    task = task or _infer_task(m, flat)
    problem = {"regression": "regression", "multilabel": "multi_label_classification",
               "classification": "single_label_classification"}.get(task)
    if problem and pooling != "pooler":
        log.warning("task.pooling=%r has no transformers equivalent: exporting the base model only", pooling)
        task = None
    heads, arch = T.HEADS.get((m.family, task), ({}, None))
    if arch is None:
        arch = T.BASE_ARCH[m.family]
    prefix = "" if arch == T.BASE_ARCH[m.family] else T.PREFIXES[m.family]
    dims = {"H": m.heads, "KV": m.num_kv_heads}
    table = T.rules(m.family, task)
    tensors, fused = {}, {}
    for path, (keys, ops) in table.items():
        if path not in flat or (path[0] == "lm_w" and m.tie_embeddings):
            continue
        if path[0] != "backbone" and arch == T.BASE_ARCH[m.family] and keys[0].startswith("^"):
            continue
        arr = np.asarray(jax.device_get(flat[path]), np.float32)
        stacked = "{i}" in keys[0]
        for i in range(m.layers) if stacked else [None]:
            key = (keys[0][1:] if keys[0].startswith("^") else prefix + keys[0]).format(i=i)
            chunk, y = T.invert(arr[i] if stacked else arr, ops, dims)
            if chunk is None:
                tensors[key] = np.ascontiguousarray(y)
            else:
                fused.setdefault(key, {})[chunk.k] = (chunk, y)
    if m.family in ("bert", "roberta") and ("backbone", "embed", "types") not in flat:
        # transformers always adds token_type_embeddings[0]: zeros keep a type-less model exact.
        tensors[prefix + "embeddings.token_type_embeddings.weight"] = np.zeros((1, m.hidden), np.float32)
    for key, parts in fused.items():
        chunk = parts[0][0]
        if len(parts) != chunk.n:
            raise WeightsError(f"export: fused tensor {key} is missing parts ({sorted(parts)})")
        tensors[key] = np.ascontiguousarray(np.concatenate([parts[k][1] for k in range(chunk.n)],
                                                           axis=chunk.axis))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_labels = flat[("cls_w",)].shape[0] if ("cls_w",) in flat else None
    if labels is None and n_labels and task not in ("qa", None):
        labels = [f"LABEL_{i}" for i in range(n_labels)]
    config = hf_config(m, arch, labels if task not in ("qa", None) else None, problem)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    log.info("exported %d tensors (%s) to %s", len(tensors), arch, out)
    return out


def torch_llama_from_gguf(path):
    """A ``transformers`` LlamaForCausalLM (float32, eager attention) holding a llama GGUF
    file's weights dequantized by jtl's own GGUF reader: the reference model of the
    GGUF parity test and of ``benchmarks/generate_vs_hf.py``. Needs torch and transformers."""
    import torch
    import transformers

    from jtl.convert.sources import GGUFSource
    from jtl.weights import source_fields
    f = source_fields(str(path))
    cfg = transformers.LlamaConfig(
        vocab_size=f["vocab_size"], hidden_size=f["hidden"], num_hidden_layers=f["layers"],
        num_attention_heads=f["heads"], num_key_value_heads=f["kv_heads"], head_dim=f["head_dim"],
        intermediate_size=f["mlp"], rms_norm_eps=f["norm_eps"], rope_theta=f["rope_theta"],
        tie_word_embeddings=f["tie_embeddings"], attn_implementation="eager")
    src = GGUFSource(Path(path), f["heads"], f["kv_heads"], f["layers"])
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict({k: torch.from_numpy(src.full(k).copy()) for k in src.keys()}, strict=False)
    return model.eval()
