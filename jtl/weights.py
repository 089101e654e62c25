"""Pretrained weights in and out: the public entry point.

``model.init_from`` may name

* a Hugging Face folder (config.json + model.safetensors or sharded
  model-*.safetensors with model.safetensors.index.json) of a bert (MiniLM),
  roberta, gpt2 or llama (Llama 2/3, SmolLM2, TinyLlama) model;
* a Hub name (``org/model``), fetched with ``huggingface_hub`` when online;
* a llama-family ``.gguf`` file (dequantized on load);
* a jtl run directory (``checkpoints/`` + ``config.yaml``): its backbone.

``resolve_config`` fills the model section from the source (keeping the user's
dropout, dtypes, scan and remat), ``params_loader`` streams the weights into
the sharded model, ``export_run`` / ``export_hf`` write a transformers folder.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import yaml

from jtl.config import Config, ConfigError, ModelConfig
from jtl.convert import hf as H
from jtl.convert.sources import GGUFSource, SafetensorsSource, WeightsError, gguf_metadata

log = logging.getLogger("jtl.weights")

__all__ = ["resolve_config", "params_loader", "export_run", "export_hf", "load_hf_tokenizer_dir",
           "WeightsError"]

# Fields a pretrained source decides; everything else stays as the user set it.
SOURCE_FIELDS = ("family", "vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp",
                 "max_len", "type_vocab", "activation", "norm_eps", "rope_theta", "tie_embeddings",
                 "pad_id", "position_offset")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*"]


def _kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return "jtl"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if path.is_dir():
        raise WeightsError(f"model.init_from={str(path)!r}: folder has neither config.json (Hugging "
                           f"Face) nor checkpoints/ + config.yaml (jtl run)")
    raise WeightsError(f"model.init_from={str(path)!r}: expected a folder, a .safetensors or a .gguf "
                       f"file (pickled .bin/.pt/.ckpt checkpoints are never read)")


@functools.lru_cache(maxsize=8)
def local_path(init_from: str) -> Path:
    """A local path for ``init_from``; Hub names are downloaded (safetensors + json/txt only)."""
    p = Path(init_from).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent  # a model.safetensors inside its HF folder
    if p.exists():
        return p
    if init_from.count("/") != 1 or init_from.startswith((".", "/")):
        raise WeightsError(f"model.init_from={init_from!r}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(init_from, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all the same to the user
        raise WeightsError(f"model.init_from={init_from!r}: not a local path and could not be fetched "
                           f"from the Hugging Face Hub ({type(e).__name__}); offline, point it to a "
                           f"local folder with config.json + model.safetensors") from None


def source_fields(init_from: str) -> dict:
    """The ModelConfig fields the pretrained source determines."""
    p = local_path(init_from)
    kind = _kind(p)
    if kind == "hf":
        f = p / "config.json"
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{f}: not valid JSON ({e})") from None
        return H.model_fields_from_hf(raw, str(f))
    if kind == "gguf":
        meta, reader = gguf_metadata(p)
        names = {t.name for t in reader.tensors}
        meta["_has_output"], meta["_has_rope_freqs"] = "output.weight" in names, "rope_freqs.weight" in names
        return H.model_fields_from_gguf(meta, str(p))
    raw = yaml.safe_load((p / "config.yaml").read_text()) or {}
    model = raw.get("model") or {}
    return {k: model[k] for k in SOURCE_FIELDS if k in model}


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with the model architecture taken from ``model.init_from`` (if set)."""
    if not cfg.model.init_from:
        return cfg
    fields = source_fields(cfg.model.init_from)
    changed = {k: v for k, v in fields.items() if getattr(cfg.model, k) != v}
    if changed:
        log.info("model fields from %s: %s", cfg.model.init_from,
                 ", ".join(f"{k}={v}" for k, v in changed.items()))
    try:
        return cfg.replace(**{f"model.{k}": v for k, v in fields.items()})
    except ConfigError as e:  # the source's own config is inconsistent: not the user's keys
        where = _config_file(cfg.model.init_from)
        raise ConfigError(f"model.init_from={cfg.model.init_from}: the architecture in {where} does not "
                          f"form a valid model ({', '.join(f'{k}={v}' for k, v in changed.items())}): "
                          f"{e}; the file is inconsistent (check it against the weights)") from None


def _config_file(init_from: str) -> str:
    p = local_path(init_from)
    if p.is_dir() and (p / "config.json").is_file():
        return str(p / "config.json")
    return str(p) + (" (GGUF metadata)" if str(p).endswith(".gguf") else "")


def params_loader(cfg: Config):
    """``load(target_params) -> {path: sharded jax.Array}`` for ``train.build`` (the target
    carries the real mesh's shardings, see ``train.concrete_target``)."""
    init_from = cfg.model.init_from
    if not init_from:
        return None
    from jtl.tasks import get as get_task
    t = get_task(cfg.task.kind)
    m, task = cfg.model, t.head if t.pretraining else t.name  # LM tasks by their head (sft: clm)

    def load(abstract_params):
        p = local_path(init_from)
        kind = _kind(p)
        if kind == "jtl":
            from jtl.checkpoint import restore_params
            out = restore_params(p, abstract_params, prefix=("backbone",))
            fresh = [".".join(map(str, k)) for k, _ in abstract_params.flat_state() if k not in out]
            if fresh:
                log.warning("newly initialized (not from %s): %s", p, ", ".join(fresh))
            return out
        if kind == "gguf":
            source = GGUFSource(p, m.heads, m.num_kv_heads, m.layers)
            if source.unused:
                log.info("GGUF tensors not used: %s", ", ".join(source.unused))
        else:
            source = SafetensorsSource(p)
        return H.load_params(m, task, source, abstract_params)

    return load


def load_hf_tokenizer_dir(init_from: str | None) -> str | None:
    """Folder holding the tokenizer of ``init_from`` (a GGUF's embedded tokenizer is converted
    once into a cache folder, ``$JTL_CACHE`` or ~/.cache/jtl), or None when there is none."""
    if not init_from:
        return None
    p = local_path(init_from)
    kind = _kind(p)
    if kind == "jtl":
        return str(p / "tokenizer") if (p / "tokenizer").is_dir() else None
    if kind == "hf" and any((p / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        return str(p)
    if kind == "gguf":
        return _gguf_tokenizer_dir(p)
    return None


def _gguf_tokenizer_dir(path: Path) -> str | None:
    """The tokenizer embedded in a GGUF file, converted once by transformers into a cache folder."""
    out = (Path(os.environ.get("JTL_CACHE", "~/.cache/jtl")).expanduser() / "gguf-tokenizers"
           / f"{path.stem}-{path.stat().st_size}")
    if (out / "tokenizer.json").exists():
        return str(out)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - an unreadable tokenizer just means "train/give one"
        log.warning("%s: could not read its tokenizer (%s: %s)", path, type(e).__name__, e)
        return None
    tok.save_pretrained(str(out))
    return str(out)


def _flat(params) -> dict:
    """nnx.State / {path: array} -> {tuple of str: array}."""
    items = params.flat_state() if hasattr(params, "flat_state") else params.items()
    out = {}
    for path, v in items:
        v = v.get_value() if hasattr(v, "get_value") else getattr(v, "value", v)
        out[tuple(map(str, path))] = v
    return out


def export_hf(model_cfg: ModelConfig, params, out_dir, tokenizer_dir=None, *, task: str | None = None,
              pooling: str = "pooler", labels=None) -> Path:
    """Write a transformers folder from jtl params (nnx.State of the model, or {path: array})."""
    return H.export_hf(model_cfg, _flat(params), out_dir, tokenizer_dir, task=task, pooling=pooling,
                       labels=labels)


class _SavedParams:
    """Abstract params (shape, dtype, one-device sharding) read from a checkpoint's metadata."""

    def __init__(self, run_dir: Path):
        import jax
        import orbax.checkpoint as ocp
        from jtl.checkpoint import find_checkpoint_dir
        ckdir = find_checkpoint_dir(run_dir)
        mngr = ocp.CheckpointManager(ckdir.absolute(), item_handlers={"params": ocp.PyTreeCheckpointHandler()})
        step = mngr.latest_step()
        if step is None:
            raise WeightsError(f"{ckdir}: no committed checkpoint")
        meta = mngr.item_metadata(step)["params"]
        mngr.close()
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.items = [(tuple(str(getattr(k, "key", k)) for k in p),
                       jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=dev))
                      for p, v in jax.tree_util.tree_flatten_with_path(meta)[0]]

    def flat_state(self):
        return self.items


def export_run(run_dir, out_dir) -> Path:
    """``jtl export RUN_DIR OUT_DIR``: the run's final params as a transformers folder."""
    from jtl import config as C
    from jtl.checkpoint import restore_params
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise WeightsError(f"{run}: not a jtl run directory (no config.yaml)")
    cfg = C.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    params = restore_params(run, _SavedParams(run))
    tok = run / "tokenizer"
    return export_hf(cfg.model, params, out_dir, tok if tok.is_dir() else None, task=cfg.task.kind,
                     pooling=cfg.task.pooling, labels=cfg.data.labels)

