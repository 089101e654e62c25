"""jtl generation vs transformers' ``generate`` on the same GGUF weights: greedy parity
on fixed prompts, and decode speed at batch 1 and 8, same process, alternating.

    python benchmarks/generate_vs_hf.py --weights weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --new-tokens 32 --rounds 3

Both sides hold the same float32 weights (``--dtype bfloat16``: jtl's rounded to bfloat16,
and its compute in bfloat16): jtl's loader and
``jtl.convert.hf.torch_llama_from_gguf`` (a transformers LlamaForCausalLM) dequantize
the file with the same reader. Parity: for each prompt (ChatML user turns), greedy
tokens from ``jtl.generate`` and from ``model.generate(do_sample=False)``, one
prompt at a time, compared token by token. Speed: each round times jtl then
transformers on the same prompts, ``--new-tokens`` tokens each with EOS ignored
(``--no-eos`` / ``min_new_tokens``); tokens/s = batch x new tokens / wall seconds
(prefill included), median over rounds, after one untimed warm-up call per side
(jtl compiles there). Writes ``benchmarks/results/generate/generate_vs_hf.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
           "Give me three colours.", "What is 12 plus 30?", "Translate 'good morning' into German."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--parity-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="jtl's weights and compute (transformers stays float32): bfloat16 halves the bytes "
                        "each decode step reads; its greedy tokens may differ from float32's")
    p.add_argument("--out", default="benchmarks/results/generate")
    args = p.parse_args(argv)
    import torch

    from jtl import bench, use_xla_defaults_for_decoding
    use_xla_defaults_for_decoding()  # as jtl generate does
    from jtl.convert.hf import torch_llama_from_gguf
    from jtl.generate import load
    torch.set_num_threads(args.threads)
    gen = load(args.weights, mesh=(1, 1, 1), overrides=[f"model.dtype={args.dtype}", f"model.param_dtype={args.dtype}"])
    hf = torch_llama_from_gguf(args.weights)
    chats = [gen.chat_prompt([{"role": "user", "content": q}]) for q in PROMPTS]
    ids = [gen.encode(c) for c in chats]

    def hf_generate(batch_ids, n, min_new=0):
        width = max(len(x) for x in batch_ids)  # left padding, as generate expects for decoders
        pad = gen.m.pad_id
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in batch_ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids])
        with torch.no_grad():
            out = hf.generate(input_ids=inp, attention_mask=mask, max_new_tokens=n, min_new_tokens=min_new,
                              do_sample=False, pad_token_id=pad, eos_token_id=list(gen.eos_ids) or None)
        return [row[width:].tolist() for row in out]

    parity = []
    for q, x in zip(PROMPTS, ids):
        j = gen.generate([x], max_new_tokens=args.parity_tokens)[0].tokens
        h = hf_generate([x], args.parity_tokens)[0]
        h = h[:next((i + 1 for i, t in enumerate(h) if t in gen.eos_ids), len(h))]  # up to its EOS
        parity.append({"prompt": q, "jtl": gen.decode_text(j), "transformers": gen.decode_text(h),
                       "same_tokens": list(j) == list(h), "jtl_tokens": list(j), "hf_tokens": h})
        print(f"[parity] {q!r}: {'same' if list(j) == list(h) else 'DIFFERENT'}: {gen.decode_text(j)!r}",
              file=sys.stderr, flush=True)

    speed = []
    n = args.new_tokens
    for batch in (1, 8):
        prompts = [ids[i % len(ids)] for i in range(batch)]
        gen.generate(prompts, max_new_tokens=n, eos=[])  # warm-up: compiles
        hf_generate(prompts, n, n)
        rounds = []
        with bench.Quiet(f"generate b{batch}") as quiet:
            for r in range(args.rounds):
                t0 = time.perf_counter()
                out = gen.generate(prompts, max_new_tokens=n, eos=[])
                tj = time.perf_counter() - t0
                assert all(len(o.tokens) == n for o in out)
                t0 = time.perf_counter()
                hf_generate(prompts, n, n)
                th = time.perf_counter() - t0
                rounds.append({"jtl_s": tj, "hf_s": th, "ratio": th / tj})
                print(f"[speed] batch {batch} round {r}: jtl {batch * n / tj:.1f} tok/s, transformers "
                      f"{batch * n / th:.1f} tok/s, ratio {th / tj:.2f}", file=sys.stderr, flush=True)
        jt = statistics.median(x["jtl_s"] for x in rounds)
        ht = statistics.median(x["hf_s"] for x in rounds)
        speed.append({"batch": batch, "new_tokens": n, "rounds": rounds, "quiet": quiet.report(),
                      "jtl_tokens_per_s": batch * n / jt, "hf_tokens_per_s": batch * n / ht,
                      "ratio_median": statistics.median(x["ratio"] for x in rounds),
                      "ratio_min": min(x["ratio"] for x in rounds), "ratio_max": max(x["ratio"] for x in rounds)})
    import transformers
    doc = {"command": " ".join(["python", "benchmarks/generate_vs_hf.py"] + (argv or sys.argv[1:])),
           "weights": args.weights, "jtl_dtype": args.dtype, "parity": parity, "speed": speed,
           "machine": {**bench.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                       "torch_threads": torch.get_num_threads()},
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    prow = "\n".join(f"| {x['prompt']} | {'yes' if x['same_tokens'] else '**no**'} | {x['jtl']!r} | "
                     f"{x['transformers']!r} |" for x in parity)
    srow = "\n".join(f"| {x['batch']} | {x['jtl_tokens_per_s']:.1f} | {x['hf_tokens_per_s']:.1f} | "
                     f"**{x['ratio_median']:.2f}x** [{x['ratio_min']:.2f}-{x['ratio_max']:.2f}] | "
                     f"{100 * (x['quiet']['others_cpu_share'] or 0):.1f}% |" for x in speed)
    text = bench.write_doc(
        Path(args.out), "generate_vs_hf", doc,
        f"jtl generate ({args.dtype}) vs transformers generate (float32) ({args.weights})",
        f"Greedy, {args.parity_tokens} new tokens, one prompt at a time:\n\n| prompt | same tokens | jtl | "
        f"transformers |\n|---|---|---|---|\n{prow}\n\nDecode speed, {n} new tokens per row (EOS ignored), "
        f"prefill included, median of {args.rounds} alternating rounds:\n\n| batch | jtl tokens/s | "
        f"transformers tokens/s | ratio | others' CPU |\n|---|---|---|---|---|\n{srow}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
