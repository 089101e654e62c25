"""Trained tokenizers are a function of the text alone (same config + seed -> same run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TRAIN = """
import json, sys
from jtl.data.tokenizer import train_tokenizer
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()[:1500]
out = {}
for kind in ("wordpiece", "bpe"):
    tok = train_tokenizer(texts, 600, kind=kind)
    out[kind] = {"vocab": tok.get_vocab(), "ids": tok(texts[:50])["input_ids"]}
print(json.dumps(out))
"""


def _train_in_fresh_process(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", TRAIN, str(REPO / "examples/data/reviews_unlabelled.txt")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tokenizer_training_is_deterministic_across_processes():
    """Two processes (other hash seeds, other Rust hash-map seeds) learn the same vocab."""
    a, b = _train_in_fresh_process("1"), _train_in_fresh_process("2")
    for kind in ("wordpiece", "bpe"):
        assert len(a[kind]["vocab"]) == 600, kind
        assert a[kind]["vocab"] == b[kind]["vocab"], kind
        assert a[kind]["ids"] == b[kind]["ids"], kind
