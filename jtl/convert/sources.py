"""Readers that hand out *regions* of checkpoint tensors as numpy arrays.

``SafetensorsSource`` parses the (tiny, documented) safetensors header itself
and reads byte ranges with ``pread``: nothing is memory-mapped, so resident
memory holds only the rows a device asked for, and a truncated file is caught
from the header before any tensor is read. ``GGUFSource`` dequantizes llama.cpp
tensors (whole tensors: quantized blocks cannot be sliced) and presents them
under Hugging Face Llama names in HF layout.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jtl.config import ConfigError


class WeightsError(ConfigError):
    """A checkpoint that cannot be read or does not fit the model."""


DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_CHUNK_BYTES = 16 << 20  # rows are read in pieces of about this size
_ALIASES = ((".gamma", ".weight"), (".beta", ".bias"))  # old BERT LayerNorm names


def _alias(key: str) -> str:
    for old, new in _ALIASES:
        if key.endswith("LayerNorm" + old):
            return key[: -len(old)] + new
    return key


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file ({size} bytes)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 256 << 20):
                raise WeightsError(f"{self.path}: corrupt or truncated safetensors file "
                                   f"(header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.tensors = {}
        for key, info in header.items():
            try:
                dtype, shape, (start, stop) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: tensor {key!r} has an unreadable header entry "
                                   f"{info!r}") from None
            if stop - start != math.prod(shape) * np.dtype(dtype).itemsize:
                raise WeightsError(f"{self.path}: tensor {key!r} {shape} {info['dtype']} does not "
                                   f"match its byte range {start}..{stop}")
            if self.base + stop > size:
                raise WeightsError(f"{self.path}: truncated: tensor {key!r} ends at byte "
                                   f"{self.base + stop} but the file has {size} bytes")
            self.tensors[_alias(key)] = (dtype, shape, start)

    def read(self, key: str, region) -> np.ndarray:
        """``region`` [(start, stop)] per axis. Reads whole rows of the first axis, in chunks."""
        dtype, shape, start = self.tensors[key]
        if not shape:
            with open(self.path, "rb") as f:
                f.seek(self.base + start)
                return np.frombuffer(f.read(np.dtype(dtype).itemsize), dtype).reshape(())
        (r0, r1), rest = region[0], region[1:]
        row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        inner = tuple(slice(a, b) for a, b in rest)
        out = np.empty((r1 - r0,) + tuple(b - a for a, b in rest), dtype)
        step = max(1, _CHUNK_BYTES // max(row, 1))
        with open(self.path, "rb", buffering=0) as f:
            for a in range(r0, r1, step):
                b = min(a + step, r1)
                buf = bytearray((b - a) * row)
                f.seek(self.base + start + a * row)
                if f.readinto(buf) != len(buf):
                    raise WeightsError(f"{self.path}: truncated while reading {key!r}")
                block = np.frombuffer(buf, dtype).reshape((b - a,) + shape[1:])
                out[a - r0: b - r0] = block[(slice(None),) + inner]
        return out


class SafetensorsSource:
    """One ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder}: no *.safetensors weights (only safetensors and GGUF "
                               f"are read; pickled *.bin checkpoints are not)")
        self.name = str(folder)
        self.where = {}
        for name in files:
            if not (folder / name).exists():
                raise WeightsError(f"{folder / name}: listed in the index but missing")
            st = SafetensorsFile(folder / name)
            for key in st.tensors:
                self.where[key] = st

    def keys(self):
        return self.where.keys()

    def shape(self, key):
        return self.where[key].tensors[key][1]

    def file(self, key) -> str:
        return str(self.where[key].path)

    def read(self, key, region):
        return self.where[key].read(key, region)


# HF Llama name -> llama.cpp GGUF name.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
}


def gguf_metadata(path: Path) -> tuple[dict, object]:
    """(scalar metadata fields, reader) of a GGUF file."""
    try:
        import gguf
    except ImportError:
        raise WeightsError("reading .gguf files needs the 'gguf' package (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types and name.startswith("tokenizer.ggml.tokens"):
                meta[name + ".count"] = len(field.data)
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # noqa: BLE001
            continue
    return meta, reader


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF rotate-half layout)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path, heads: int, kv_heads: int, layers: int):
        import gguf
        self.name = str(path)
        self.meta, reader = gguf_metadata(path)
        self._gguf = gguf
        by_name = {t.name: t for t in reader.tensors}
        self.tensors = {}
        for hf, gg in GGUF_NAMES.items():
            for i in range(layers) if "{i}" in hf else [None]:
                g = gg.format(i=i)
                if g in by_name:
                    self.tensors[hf.format(i=i)] = by_name[g]
        self.unused = sorted(set(by_name) - {t.name for t in self.tensors.values()})
        self.heads = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}
        self._cache: dict = {}

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return tuple(int(s) for s in reversed(self.tensors[key].shape))  # GGUF lists fastest dim first

    def file(self, key) -> str:
        return f"{self.name}:{self.tensors[key].name}"

    def full(self, key) -> np.ndarray:
        if key not in self._cache:
            t = self.tensors[key]
            w = self._gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.shape(key))
            for part, n in self.heads.items():
                if part in key:
                    w = unpermute_rope(w, n)
            self._cache[key] = np.asarray(w, np.float32)
        return self._cache[key]

    def release(self):
        """Called after each jtl parameter: its (per-layer) tensors are not needed again."""
        self._cache = {}

    def read(self, key, region):
        return self.full(key)[tuple(slice(a, b) for a, b in region)]
