"""The one declarative table of Hugging Face <-> jtl parameter names, per family.

Each rule says where a jtl parameter lives in a HF checkpoint and which
elementary ops turn the HF tensor into the jtl tensor (read in that order for
import, inverted in reverse order for export):

* ``Chunk(axis, k, n)``  the k-th of n equal parts of ``axis`` (GPT-2 fused c_attn)
* ``T()``                2-D transpose (GPT-2 Conv1D stores [in, out])
* ``Heads(axis, "H")``   split ``axis`` into (heads, head_dim); "H" = query heads,
                         "KV" = key/value heads

Every op also maps a *region* of its output back to the region of its input it
needs, so a device can read just its own shard of a parameter from disk.

HF keys are relative to the base model's prefix (``bert.``, ``model.``, ...)
unless they start with ``^`` (absolute: heads such as ``lm_head.weight``).
Keys with ``{i}`` are per layer and are stacked on jtl's leading layers axis.
A tuple of keys lists alternatives (the first present is read, the first is written).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from jtl.tasks import kinds


@dataclass(frozen=True)
class Chunk:
    axis: int
    k: int
    n: int

    def shape(self, s, dims):
        if s[self.axis] % self.n:
            return None
        s = list(s)
        s[self.axis] //= self.n
        return tuple(s)

    def back(self, region, in_shape, dims):
        c = in_shape[self.axis] // self.n
        r = list(region)
        a, b = r[self.axis]
        r[self.axis] = (a + self.k * c, b + self.k * c)
        return r

    def apply(self, x, region_in, region_out, dims):
        return x  # the read region already lies inside the chunk


@dataclass(frozen=True)
class T:
    def shape(self, s, dims):
        return tuple(reversed(s)) if len(s) == 2 else None

    def back(self, region, in_shape, dims):
        return list(reversed(region))

    def apply(self, x, region_in, region_out, dims):
        return x.T

    def invert(self, y, dims):
        return y.T


@dataclass(frozen=True)
class Heads:
    axis: int
    count: str  # "H" or "KV"

    def shape(self, s, dims):
        n = dims[self.count]
        if len(s) <= self.axis or s[self.axis] % n:
            return None
        return s[:self.axis] + (n, s[self.axis] // n) + s[self.axis + 1:]

    def back(self, region, in_shape, dims):
        size = in_shape[self.axis] // dims[self.count]
        (h0, h1) = region[self.axis]
        # Whole heads are read; the head_dim slice is taken after the reshape.
        return list(region[:self.axis]) + [(h0 * size, h1 * size)] + list(region[self.axis + 2:])

    def apply(self, x, region_in, region_out, dims):
        (h0, h1), (d0, d1) = region_out[self.axis], region_out[self.axis + 1]
        size = x.shape[self.axis] // (h1 - h0)
        x = x.reshape(x.shape[:self.axis] + (h1 - h0, size) + x.shape[self.axis + 1:])
        index = [slice(None)] * x.ndim
        index[self.axis + 1] = slice(d0, d1)
        return x[tuple(index)]

    def invert(self, y, dims):
        return y.reshape(y.shape[:self.axis] + (-1,) + y.shape[self.axis + 2:])


QH, KH, OH = (Heads(0, "H"),), (Heads(0, "KV"),), (Heads(1, "H"),)

_BERT_LAYER = {
    "q_w": ("encoder.layer.{i}.attention.self.query.weight", QH),
    "q_b": ("encoder.layer.{i}.attention.self.query.bias", QH),
    "k_w": ("encoder.layer.{i}.attention.self.key.weight", KH),
    "k_b": ("encoder.layer.{i}.attention.self.key.bias", KH),
    "v_w": ("encoder.layer.{i}.attention.self.value.weight", KH),
    "v_b": ("encoder.layer.{i}.attention.self.value.bias", KH),
    "o_w": ("encoder.layer.{i}.attention.output.dense.weight", OH),
    "o_b": ("encoder.layer.{i}.attention.output.dense.bias", ()),
    "attn_norm_scale": ("encoder.layer.{i}.attention.output.LayerNorm.weight", ()),
    "attn_norm_bias": ("encoder.layer.{i}.attention.output.LayerNorm.bias", ()),
    "up_w": ("encoder.layer.{i}.intermediate.dense.weight", ()),
    "up_b": ("encoder.layer.{i}.intermediate.dense.bias", ()),
    "down_w": ("encoder.layer.{i}.output.dense.weight", ()),
    "down_b": ("encoder.layer.{i}.output.dense.bias", ()),
    "mlp_norm_scale": ("encoder.layer.{i}.output.LayerNorm.weight", ()),
    "mlp_norm_bias": ("encoder.layer.{i}.output.LayerNorm.bias", ()),
}
_BERT_EMBED = {
    "embed.tokens": ("embeddings.word_embeddings.weight", ()),
    "embed.positions": ("embeddings.position_embeddings.weight", ()),
    "embed.types": ("embeddings.token_type_embeddings.weight", ()),
    "embed.norm_scale": ("embeddings.LayerNorm.weight", ()),
    "embed.norm_bias": ("embeddings.LayerNorm.bias", ()),
}


def _qkv(kind, k):  # GPT-2's fused c_attn: [D, 3D] weight, [3D] bias
    if kind == "w":
        return ("h.{i}.attn.c_attn.weight", (Chunk(1, k, 3), T(), Heads(0, "H")))
    return ("h.{i}.attn.c_attn.bias", (Chunk(0, k, 3), Heads(0, "H")))


# family -> {jtl path without "backbone.": (hf key(s), ops)}
BACKBONE = {
    "bert": {**_BERT_EMBED, **{f"layers.{k}": v for k, v in _BERT_LAYER.items()}},
    "roberta": {**_BERT_EMBED, **{f"layers.{k}": v for k, v in _BERT_LAYER.items()}},
    "gpt2": {
        "embed.tokens": ("wte.weight", ()),
        "embed.positions": ("wpe.weight", ()),
        "layers.q_w": _qkv("w", 0), "layers.k_w": _qkv("w", 1), "layers.v_w": _qkv("w", 2),
        "layers.q_b": _qkv("b", 0), "layers.k_b": _qkv("b", 1), "layers.v_b": _qkv("b", 2),
        "layers.o_w": ("h.{i}.attn.c_proj.weight", (T(), Heads(1, "H"))),
        "layers.o_b": ("h.{i}.attn.c_proj.bias", ()),
        "layers.attn_norm_scale": ("h.{i}.ln_1.weight", ()),
        "layers.attn_norm_bias": ("h.{i}.ln_1.bias", ()),
        "layers.up_w": ("h.{i}.mlp.c_fc.weight", (T(),)),
        "layers.up_b": ("h.{i}.mlp.c_fc.bias", ()),
        "layers.down_w": ("h.{i}.mlp.c_proj.weight", (T(),)),
        "layers.down_b": ("h.{i}.mlp.c_proj.bias", ()),
        "layers.mlp_norm_scale": ("h.{i}.ln_2.weight", ()),
        "layers.mlp_norm_bias": ("h.{i}.ln_2.bias", ()),
        "final_norm_scale": ("ln_f.weight", ()),
        "final_norm_bias": ("ln_f.bias", ()),
    },
    "llama": {
        "embed.tokens": ("embed_tokens.weight", ()),
        "layers.q_w": ("layers.{i}.self_attn.q_proj.weight", QH),
        "layers.k_w": ("layers.{i}.self_attn.k_proj.weight", KH),
        "layers.v_w": ("layers.{i}.self_attn.v_proj.weight", KH),
        "layers.o_w": ("layers.{i}.self_attn.o_proj.weight", OH),
        "layers.gate_w": ("layers.{i}.mlp.gate_proj.weight", ()),
        "layers.up_w": ("layers.{i}.mlp.up_proj.weight", ()),
        "layers.down_w": ("layers.{i}.mlp.down_proj.weight", ()),
        "layers.attn_norm_scale": ("layers.{i}.input_layernorm.weight", ()),
        "layers.mlp_norm_scale": ("layers.{i}.post_attention_layernorm.weight", ()),
        "final_norm_scale": ("norm.weight", ()),
    },
}

_BERT_MLM = {
    "mlm_w": ("^cls.predictions.transform.dense.weight", ()),
    "mlm_b": ("^cls.predictions.transform.dense.bias", ()),
    "mlm_norm_scale": ("^cls.predictions.transform.LayerNorm.weight", ()),
    "mlm_norm_bias": ("^cls.predictions.transform.LayerNorm.bias", ()),
    "mlm_out_b": (("^cls.predictions.bias", "^cls.predictions.decoder.bias"), ()),
    "lm_w": ("^cls.predictions.decoder.weight", ()),
}
_ROBERTA_MLM = {
    "mlm_w": ("^lm_head.dense.weight", ()),
    "mlm_b": ("^lm_head.dense.bias", ()),
    "mlm_norm_scale": ("^lm_head.layer_norm.weight", ()),
    "mlm_norm_bias": ("^lm_head.layer_norm.bias", ()),
    "mlm_out_b": (("^lm_head.bias", "^lm_head.decoder.bias"), ()),
    "lm_w": ("^lm_head.decoder.weight", ()),
}
_BERT_POOLER = {"pooler_w": ("pooler.dense.weight", ()), "pooler_b": ("pooler.dense.bias", ())}
_SEQ = kinds(head="sequence")  # every pooled-head task shares the HF sequence-classification head

# (family, task kind) -> (head rules, HF architecture for export)
HEADS = {
    **{("bert", t): ({**_BERT_POOLER, "cls_w": ("^classifier.weight", ()),
                      "cls_b": ("^classifier.bias", ())}, "BertForSequenceClassification")
       for t in _SEQ},
    ("bert", "mlm"): (_BERT_MLM, "BertForMaskedLM"),
    ("bert", "token_classification"): ({"cls_w": ("^classifier.weight", ()),
                                        "cls_b": ("^classifier.bias", ())}, "BertForTokenClassification"),
    ("bert", "qa"): ({"cls_w": ("^qa_outputs.weight", ()), "cls_b": ("^qa_outputs.bias", ())},
                     "BertForQuestionAnswering"),
    # RobertaClassificationHead = dense + tanh + out_proj on <s>: jtl's pooler + classifier.
    **{("roberta", t): ({"pooler_w": ("^classifier.dense.weight", ()),
                         "pooler_b": ("^classifier.dense.bias", ()),
                         "cls_w": ("^classifier.out_proj.weight", ()),
                         "cls_b": ("^classifier.out_proj.bias", ())}, "RobertaForSequenceClassification")
       for t in _SEQ},
    ("roberta", "mlm"): (_ROBERTA_MLM, "RobertaForMaskedLM"),
    ("roberta", "token_classification"): ({"cls_w": ("^classifier.weight", ()),
                                           "cls_b": ("^classifier.bias", ())},
                                          "RobertaForTokenClassification"),
    ("roberta", "qa"): ({"cls_w": ("^qa_outputs.weight", ()), "cls_b": ("^qa_outputs.bias", ())},
                        "RobertaForQuestionAnswering"),
    ("gpt2", "clm"): ({"lm_w": ("^lm_head.weight", ())}, "GPT2LMHeadModel"),
    ("llama", "clm"): ({"lm_w": ("^lm_head.weight", ())}, "LlamaForCausalLM"),
}
BASE_ARCH = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2Model", "llama": "LlamaModel"}
# The base model's own prefix inside *For* checkpoints (stripped when present).
PREFIXES = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}
# Buffers and leftovers that carry no weights.
IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def rules(family: str, task: str) -> dict:
    """{jtl path tuple: (hf keys tuple, ops)} for a model of ``family`` with head ``task``."""
    out = {}
    for name, (keys, ops) in BACKBONE[family].items():
        out[("backbone",) + tuple(name.split("."))] = (_keys(keys), ops)
    heads = HEADS.get((family, task), ({}, None))[0]
    for name, (keys, ops) in heads.items():
        out[(name,)] = (_keys(keys), ops)
    return out


def known_keys(family: str) -> set:
    """Every (templated) HF key any head or backbone rule of ``family`` reads."""
    keys = set()
    pooler = [_BERT_POOLER] if family in ("bert", "roberta") else []  # RobertaModel has one too
    for table in [BACKBONE[family]] + [h for (f, _), (h, _) in HEADS.items() if f == family] + pooler:
        for k, _ in table.values():
            keys.update(_keys(k))
    return keys


def _keys(k) -> tuple:
    return k if isinstance(k, tuple) else (k,)


def converted_shape(shape, ops, dims):
    """Shape after the ops, or None when the ops cannot apply (indivisible, wrong rank)."""
    s = tuple(shape)
    for op in ops:
        s = op.shape(s, dims)
        if s is None:
            return None
    return s


def read_region(read, key: str, in_shape, ops, dims, region_out):
    """Read only what ``region_out`` of the converted tensor needs; ``read(key, region)``."""
    shapes = [tuple(in_shape)]
    for op in ops:
        shapes.append(op.shape(shapes[-1], dims))
    regions = [list(region_out)]
    for op, s_in in zip(reversed(ops), reversed(shapes[:-1])):
        regions.append(op.back(regions[-1], s_in, dims))
    regions.reverse()
    x = read(key, regions[0])
    for op, r_in, r_out in zip(ops, regions[:-1], regions[1:]):
        x = op.apply(x, r_in, r_out, dims)
    return x


def invert(y: np.ndarray, ops, dims):
    """jtl tensor -> HF tensor, or (chunk op, piece) when it is part of a fused tensor."""
    for i, op in enumerate(reversed(ops)):
        if isinstance(op, Chunk):
            assert i == len(ops) - 1, "a Chunk must be the first op"
            return op, y
        y = op.invert(y, dims)
    return None, y
