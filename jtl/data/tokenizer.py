"""Fast tokenizers: load from a HF folder / tokenizer.json, or train a small one from data."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

from jtl.config import ConfigError

log = logging.getLogger(__name__)

ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<|endoftext|>"]


def load_tokenizer(path: str):
    """A ``PreTrainedTokenizerFast`` from a folder (tokenizer.json, or vocab.txt for BERT)
    or a tokenizer.json file. Never runs remote code."""
    from transformers import PreTrainedTokenizerFast
    p = Path(path)
    if p.is_dir() and _generic_class(p):
        # jtl's own tokenizers (and any folder that names the generic class): the class
        # AutoTokenizer would pick, without importing every tokenizer class it knows (2 s).
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    from transformers import AutoTokenizer
    if p.is_file():
        if p.suffix != ".json":
            raise ConfigError(f"data.tokenizer={path!r}: expected a tokenizer.json file or a folder")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        cfg_file = p.with_name("tokenizer_config.json")
        if cfg_file.exists():
            tok = AutoTokenizer.from_pretrained(str(p.parent), trust_remote_code=False)
        return tok
    if p.is_dir():
        if not any((p / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
            raise ConfigError(f"{path}: no tokenizer.json, vocab.txt or vocab.json in this folder")
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False, use_fast=True)
    try:  # a hub name; works when online
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, use_fast=True)
    except Exception as e:
        raise ConfigError(f"tokenizer {path!r}: not a local file/folder and could not be fetched "
                          f"from the hub ({type(e).__name__}); offline, point to a local folder "
                          f"with tokenizer.json") from None


def _generic_class(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer.json whose tokenizer_config.json names the
    generic fast-tokenizer class (what jtl writes), not a model-specific one."""
    cfg_file = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not cfg_file.is_file():
        return False
    try:
        name = json.loads(cfg_file.read_text()).get("tokenizer_class")
    except (ValueError, OSError, AttributeError):
        return False  # AutoTokenizer reports the broken file
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, kind: str, lowercase: bool = True,
                    out_dir: str | Path | None = None):
    """Train a WordPiece (``kind='wordpiece'``, BERT-style specials) or byte-level BPE
    (``kind='bpe'``, GPT-2 style) tokenizer; saved to ``out_dir`` when given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if kind == "wordpiece":
        normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(list(texts), vocab_size, normalizer,
                                                                pre_tokenizer), unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens(ENCODER_SPECIALS)  # already ids 0-4 of the vocab
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DECODER_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _wordpiece_vocab(texts: list[str], vocab_size: int, normalizer, pre_tokenizer) -> dict[str, int]:
    """A WordPiece vocabulary (token -> id) learnt from ``texts``, the same in every process.

    ``tokenizers``' WordPieceTrainer gives the ``##c`` continuation tokens their ids in
    the iteration order of a Rust hash map (randomly seeded per process), and merges of
    equal count are ordered by id, so two runs on the same text learn different
    vocabularies. Here every initial token (specials, characters, ``##`` characters) is
    handed to the trainer in sorted order, which fixes all ids and therefore every tie."""
    from tokenizers import Tokenizer, models, trainers
    chars, inner = set(), set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            chars.update(word)
            inner.update(word[1:])
    fixed = ENCODER_SPECIALS + sorted(chars) + ["##" + c for c in sorted(inner)]
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    scratch.normalizer, scratch.pre_tokenizer = normalizer, pre_tokenizer
    scratch.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=fixed))
    return scratch.get_vocab(with_added_tokens=False)


def special_ids(tok) -> dict:
    """The ids a task needs, whatever the tokenizer family."""
    ids = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id,
           "mask": tok.mask_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"] if ids["eos"] is not None else 0
    return ids


def vocab_size(tok) -> int:
    return len(tok)


def describe(tok) -> str:
    return json.dumps({"class": type(tok).__name__, "vocab": len(tok), **special_ids(tok)})
