"""What one compiled decode step of jtl's generation loop reads and writes: XLA's
``cost_analysis()`` of the decode program (one ``while`` body, i.e. one token) and the
bytes its ops write, by kind, for a random-weight decoder of SmolLM2-135M's shape (30
layers, hidden 576, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied embeddings).

    python benchmarks/generate_hlo.py --batch 1 8 [--prompt-bucket 64 --new-tokens 32] \
        [--dtype bfloat16] [--dump DIR]

No weights and no timing: the figures are the compiled program's, the same on a busy
machine. A copy of the weights or of the whole KV cache per token shows as a large
``copy`` / ``slice`` / ``transpose`` line.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = {"model.family": "llama", "model.vocab_size": 49152, "model.hidden": 576, "model.layers": 30,
           "model.heads": 9, "model.kv_heads": 3, "model.mlp": 1536, "model.max_len": 2048,
           "model.tie_embeddings": True, "model.norm_eps": 1e-5, "model.rope_theta": 100000.0,
           "model.dropout": 0.0, "model.attention_dropout": 0.0, "task.kind": "clm", "data.seq_len": 16}
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def written_bytes(hlo: str) -> collections.Counter:
    """Bytes written per op kind (fusions by their name) in the decode loop's while body."""
    body = re.search(r"while\([^\n]*body=(%[\w.\-]+)", hlo).group(1)
    start = hlo.index("\n" + body + " ")
    text = hlo[start:hlo.index("\n}", start)]
    out = collections.Counter()
    for m in re.finditer(r"\n\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(", text):
        name, dt, dims, op = m.groups()
        if op in ("parameter", "get-tuple-element", "bitcast", "constant", "tuple"):
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        kind = "fusion:" + re.sub(r"[.]\d+$", "", name) if op == "fusion" else op
        out[kind] += n * BYTES.get(dt, 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-bucket", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dump", help="write each program's optimized HLO text here")
    args = p.parse_args(argv)
    import jax
    import numpy as np
    from flax import nnx

    from jtl import config, sharding as S
    from jtl.generate import Generator
    from jtl.models import Model
    cfg = config.Config().replace(**SMOLLM2, **{"model.dtype": args.dtype, "model.param_dtype": args.dtype})
    mesh = S.make_mesh((1, 1, 1))
    with S.activate(mesh):
        graphdef, params = nnx.split(Model(cfg.model, "clm", rngs=nnx.Rngs(0)))
    gen = Generator(cfg, graphdef, params, mesh)
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    print(f"weights: {weights / 1e6:.0f} MB ({args.dtype})")
    pb, n = args.prompt_bucket, args.new_tokens
    knobs = (np.float32(1), np.int32(0), np.float32(1))
    for b in args.batch:
        fixed = (np.ones((b, pb), np.int32), np.zeros((b,), np.int32), np.arange(b, dtype=np.int32),
                 np.ones((b,), bool), jax.random.key(0), np.asarray([-1], np.int32), knobs)
        with S.activate(mesh):
            layers = gen.layers()
            state = jax.eval_shape(lambda *a: gen._prefill_fn(*a, n_new=n, cache_len=pb + n, static=(True, False)),
                                   params, layers, *fixed)
            compiled = gen._decode.lower(params, layers, state, np.int32(n), fixed[4], fixed[5], knobs,
                                         static=(True, False)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        hlo = compiled.as_text()
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            (Path(args.dump) / f"decode_b{b}.hlo").write_text(hlo)
        w = written_bytes(hlo)
        print(f"\nbatch {b}, cache {pb + n} slots: one decode step accesses {cost['bytes accessed'] / 1e6:.0f} MB, "
              f"{cost['flops'] / 1e9:.2f} GFLOP; its ops write {sum(w.values()) / 1e6:.1f} MB:")
        for kind, v in w.most_common(6):
            print(f"  {v / 1e6:8.1f} MB  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
