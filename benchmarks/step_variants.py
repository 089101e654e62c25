"""Which implementation choice makes jtl's train step faster: variants of one
preset's step (config overrides), timed in one process, alternating, on the
same synthetic batch.

    .venv/bin/python benchmarks/step_variants.py --preset minilm-l6 --batch 32 --seq 128 \
        --variant base: --variant rbg:train.rng_impl=rbg --variant unsafe_rbg:train.rng_impl=unsafe_rbg \
        --rounds 6 --steps 2 --out benchmarks/results/cpu/variants-rng

``--variant NAME:key=value,key=value`` (an empty override list is the preset as
it is); besides config keys, ``jtl.threefry=rolled|unrolled`` picks jax's CPU
lowering of the threefry hash for that variant (``jtl.models.layers.threefry_unrolled_on_cpu``;
jtl's default is unrolled) and ``jtl.layer_norm=twopass|onepass`` the layer norm
(jtl's two-pass statistics, or a one-pass E[x^2] - E[x]^2 version), and
``jtl.attention=einsum|scaleq|jaxdpa`` the attention (jtl's, 1/sqrt(d) on q instead of
the logits, or ``jax.nn.dot_product_attention``, which has no attention dropout); ``jtl.dropout=bits32|bits8``
(jax.random.bernoulli's 32 random bits per element, jtl's, or 8), ``jtl.gelu=erf|erfc``,
``jtl.qkv=separate|stacked`` (three products for q, k, v, jtl's, or one) and ``jtl.top1=max|argmax``
(the training accuracy). Each round times ``--steps`` steps of every variant in turn (the order
rotates every round); the report gives each variant's median step time and its
speed ratio to the first variant, median [min-max] over rounds. The machine's
quietness is recorded (``jtl.bench.Quiet``); a run that was not quiet says so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from jtl import bench, train  # noqa: E402
from jtl.models.layers import _attention as _SHIPPED_ATTENTION  # noqa: E402
from jtl.models.layers import layer_norm as _SHIPPED_LAYER_NORM, threefry_unrolled_on_cpu  # noqa: E402
from jtl.models import layers as _layers, transformer  # noqa: E402
from jtl.tasks import base as _base, clm, mlm  # noqa: E402
from peer_pytorch import jtl_side, timed  # noqa: E402

_SHIPPED = {"dropout": _layers.dropout, "gelu": _layers.gelu, "qkv": transformer.project_qkv,
            "top1": _base.top1_correct}


def _layer_norm_one_pass(x, scale, bias, eps):
    """A layer norm that reads x once for both statistics (E[x], E[x^2]); jtl ships the
    two-pass one (benchmarks/results/cpu/variants-layernorm: no faster on CPU)."""
    import jax.numpy as jnp
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def _attention_scale_q(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, dropout_rate, rng):
    """jtl's multi-head attention with 1/sqrt(d) applied to q ([B,S,H,D]) instead of
    to the logits ([B,H,S,S])."""
    import math

    import jax.numpy as jnp
    from jtl.models import layers as L
    if k_BSKD.shape[2] != q_BSHD.shape[2]:
        return _SHIPPED_ATTENTION(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, dropout_rate, rng)
    q = q_BSHD * jnp.asarray(1.0 / math.sqrt(q_BSHD.shape[-1]), q_BSHD.dtype)
    logits = jnp.einsum("bqhd,bthd->bhqt", q, k_BSKD)
    logits = jnp.where(mask_B1SS, logits.astype(jnp.float32), L.NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
    probs = L.dropout(probs, dropout_rate, rng)
    return jnp.einsum("bhqt,bthd->bqhd", probs, v_BSKD)


def _attention_jax_dpa(q_BSHD, k_BSKD, v_BSKD, mask_B1SS, dropout_rate, rng):
    """``jax.nn.dot_product_attention`` (XLA implementation); it has no attention dropout."""
    if dropout_rate and rng is not None:
        raise SystemExit("jtl.attention=jaxdpa has no attention dropout: add model.attention_dropout=0")
    return jax.nn.dot_product_attention(q_BSHD, k_BSKD, v_BSKD, mask=mask_B1SS, implementation="xla")


def _dropout_8_bits(x, rate, rng):
    """Dropout whose keep/drop decisions read 8 random bits each (four per 32-bit word, a
    quarter of the threefry hashing), rate rounded to a multiple of 1/256 and the kept values
    scaled by the exact inverse keep probability. The words are materialized first: fused
    into the consumer, XLA hashed once per byte. Not shipped: no faster in the step."""
    import jax.numpy as jnp
    if rng is None or rate == 0.0:
        return x
    drop = int(round(rate * 256))
    if x.shape[-1] % 4 or not 0 < drop < 256:
        return _SHIPPED["dropout"](x, rate, rng)
    with jax.named_scope("dropout"):
        words = jax.lax.optimization_barrier(jax.random.bits(rng, (*x.shape[:-1], x.shape[-1] // 4), jnp.uint32))
        keep = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(x.shape) >= drop
        return jnp.where(keep, x * jnp.asarray(256.0 / (256 - drop), x.dtype), 0).astype(x.dtype)


def _gelu_erfc(x):
    """jax.nn.gelu(approximate=False): the erfc form jtl used before."""
    return jax.nn.gelu(x, approximate=False)


def _qkv_stacked(cfg, p, h, dtype):
    """q, k and v as one product with the weights stacked [3, H, D, embed] (multi-head
    layers only). Not shipped: no faster in the step."""
    import jax.numpy as jnp
    from jtl.models import layers as L
    if p["q_w"].shape != p["k_w"].shape:  # grouped-query: three products
        return _SHIPPED["qkv"](cfg, p, h, dtype)
    w = jnp.stack([p["q_w"], p["k_w"], p["v_w"]])
    bias = jnp.stack([p["q_b"], p["k_b"], p["v_b"]]) if "q_b" in p else None
    qkv = L.dense(h, w, bias, dtype)  # [B, S, 3, H, D]
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _top1_argmax(logits, labels):
    """Training accuracy through argmax (jtl before ``tasks.base.top1_correct``)."""
    return (logits.argmax(-1) == labels).astype("float32")


# jtl.NAME=VALUE overrides: implementation switches that are not config keys (the
# alternatives jtl does not ship are kept here, to compare against). Each maps a value
# to (module, attribute, replacement); None keeps what jtl ships.
_SWITCHES = {"layer_norm": {"twopass": None, "onepass": _layer_norm_one_pass},
             "attention": {"einsum": None, "scaleq": _attention_scale_q, "jaxdpa": _attention_jax_dpa},
             "dropout": {"bits32": None, "bits8": _dropout_8_bits},
             "gelu": {"erf": None, "erfc": _gelu_erfc},
             "qkv": {"separate": None, "stacked": _qkv_stacked},
             "top1": {"max": None, "argmax": _top1_argmax}}


def apply_switches(over: list[str]) -> None:
    from jtl.models import layers
    want = dict(o[len("jtl."):].split("=", 1) for o in over if o.startswith("jtl."))
    threefry_unrolled_on_cpu(want.pop("threefry", "unrolled") != "rolled")
    impl = _SWITCHES["layer_norm"][want.pop("layer_norm", "twopass")]
    layers.layer_norm = jax.named_scope("norm")(impl) if impl else _SHIPPED_LAYER_NORM
    impl = _SWITCHES["attention"][want.pop("attention", "einsum")]
    layers._attention = impl or _SHIPPED_ATTENTION
    layers.dropout = _SWITCHES["dropout"][want.pop("dropout", "bits32")] or _SHIPPED["dropout"]
    layers.gelu = _SWITCHES["gelu"][want.pop("gelu", "erf")] or _SHIPPED["gelu"]
    transformer.project_qkv = _SWITCHES["qkv"][want.pop("qkv", "separate")] or _SHIPPED["qkv"]
    top1 = _SWITCHES["top1"][want.pop("top1", "max")] or _SHIPPED["top1"]
    mlm.top1_correct = clm.top1_correct = top1
    if want:
        raise SystemExit(f"unknown jtl.* switches {sorted(want)}: known threefry, {', '.join(_SWITCHES)}")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,... (NAME: for the preset as is)")
    return name, [o for o in rest.split(",") if o]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="minilm-l6")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--variant", action="append", required=True, help="NAME:key=value,...")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="runs/bench/variants")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    steps = {}
    for name, over in variants:
        apply_switches(over)
        jax.clear_caches()
        train._PROGRAMS.clear()  # each variant lowers and compiles its own program
        cfg = bench.bench_config(args.preset, args.batch, args.seq, "float32",
                                 [o for o in over if not o.startswith("jtl.")])
        step, _, compile_s = jtl_side(cfg)
        step(), step()  # first calls allocate
        steps[name] = step
        print(f"[variants] {name}: compiled in {compile_s:.1f} s ({', '.join(over) or 'preset as is'})",
              file=sys.stderr, flush=True)
    names = [n for n, _ in variants]
    rounds = []
    with bench.Quiet("variants") as quiet:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            times = {n: timed(steps[n], args.steps)[0] for n in order}
            rounds.append(times)
            print(f"[variants] round {r}: " + ", ".join(f"{n} {1e3 * times[n]:.0f} ms" for n in names),
                  file=sys.stderr, flush=True)
    base = names[0]
    tokens = args.batch * args.seq
    results = []
    for name, over in variants:
        ratios = [rd[base] / rd[name] for rd in rounds]
        med = statistics.median(rd[name] for rd in rounds)
        results.append({"variant": name, "overrides": over, "step_s_median": med, "tokens_per_s": tokens / med,
                        "speed_vs_first_median": statistics.median(ratios), "speed_vs_first_min": min(ratios),
                        "speed_vs_first_max": max(ratios)})
    rows = [[r["variant"], ", ".join(r["overrides"]) or "(preset)", f"{1e3 * r['step_s_median']:.0f}",
             f"{r['tokens_per_s']:.0f}",
             f"**{r['speed_vs_first_median']:.3f}x** [{r['speed_vs_first_min']:.3f}-{r['speed_vs_first_max']:.3f}]"]
            for r in results]
    table = bench.md_table(["variant", "overrides", "step ms (median)", "tokens/s", f"speed vs {base}"], rows)
    q = quiet.report()
    machine = bench.machine()
    doc = {"kind": "step_variants", "command": " ".join(sys.argv), "preset": args.preset, "batch": args.batch,
           "seq": args.seq, "rounds": rounds, "results": results, "quiet": q, "machine": machine,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    bench.write_doc(Path(args.out), "variants", doc, f"Train-step variants: {args.preset} B={args.batch} S={args.seq}",
                    f"{table}\n\n{args.rounds} alternating rounds of {args.steps} steps. Machine: {quiet.describe()}.")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
