"""Step-time overhead of checkpointing every N steps, async vs sync, in one process.

    python benchmarks/async_save_overhead.py [--every 10] [--blocks 6] [--block-steps 20] [k=v overrides]

Builds one pretraining setup (configs/tiny-mlm.yaml, or a MiniLM-sized encoder with
``--minilm``), compiles it, then runs interleaved blocks of ``--block-steps`` steps:
no saving / async save every N steps / sync save every N steps (same step function,
same data pipeline, same state). Interleaving spreads the load of other processes
over all three modes. Each block ends with ``block_until_ready`` and waits for its
saves to commit, so the time of writing is charged to the block that started it.
Reports mean step time per mode and the ratios to no saving.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
MINILM = ["model.hidden=384", "model.layers=6", "model.heads=12", "model.mlp=1536", "model.vocab_size=8192",
          "data.tokenizer_vocab=8000", "data.seq_len=128", "model.max_len=128", "train.batch_size=32"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--block-steps", type=int, default=20)
    ap.add_argument("--minilm", action="store_true", help="MiniLM-L6-sized encoder instead of tiny-mlm")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/async_save_overhead.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import jax
    from jtl import checkpoint as ckpt
    from jtl import config as C
    from jtl import sharding as S
    from jtl.data import lm
    from jtl.data.pipeline import train_iterator
    from jtl.data.tokenizer import special_ids
    from jtl.pretrain import _texts
    from jtl.run.birth import tokenizer as get_tokenizer
    from jtl.tasks import TaskSpec, mlm_max_predictions
    from jtl.train import build

    root = Path(tempfile.mkdtemp(prefix="jtl_save_bench_"))
    over = (MINILM if args.minilm else []) + [f"data.train={REPO / 'examples/data/reviews_unlabelled.txt'}",
                                              f"run_dir={root}", "train.progress=false"] + args.overrides
    cfg = C.load(str(REPO / "configs/tiny-mlm.yaml"), over)
    texts, wheres = _texts(cfg, cfg.data.train, "train")
    tok = get_tokenizer(cfg, texts, root)
    rows = lm.build_lm_rows(texts, wheres, tok, kind="mlm", seq_len=cfg.data.seq_len,
                            vocab_limit=cfg.model.vocab_size, pack_rows=cfg.data.pack)
    spec = TaskSpec(mask_id=special_ids(tok)["mask"] or 0,
                    max_predictions=mlm_max_predictions(cfg.data.seq_len, cfg.data.mask_prob))
    total = args.blocks * 3 * args.block_steps + 10
    mesh = S.make_mesh(cfg.mesh)
    setup = build(cfg, spec, mesh, total)
    it = train_iterator(rows, cfg.train.batch_size, seed=0)
    state = setup.state
    for _ in range(3):  # compile + warm up
        state, m = setup.train_step(state, S.global_batch(mesh, next(it)))
    jax.block_until_ready(state)
    managers = {"async": ckpt.manager(root / "async", keep=2, async_save=True),
                "sync": ckpt.manager(root / "sync", keep=2, async_save=False)}
    # one save each outside the timing: the first save sets up directories/threads
    for mode, mngr in managers.items():
        ckpt.save(mngr, 1, state, cfg.to_dict(), it.get_state())
        ckpt.wait(mngr)
    times = {"none": [], "async": [], "sync": []}
    step = 1
    for b in range(args.blocks):
        for mode in ("none", "async", "sync"):
            t = time.perf_counter()
            for _ in range(args.block_steps):
                step += 1
                state, m = setup.train_step(state, S.global_batch(mesh, next(it)))
                if mode != "none" and step % args.every == 0:
                    ckpt.save(managers[mode], step, state, cfg.to_dict(), it.get_state())
            jax.block_until_ready(state)
            if mode != "none":
                ckpt.wait(managers[mode])
            times[mode].append((time.perf_counter() - t) / args.block_steps)
    for mngr in managers.values():
        mngr.close()
    n_params = sum(x.size for x in jax.tree.leaves(ckpt._to_pure(state[0])))
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    result = {"model_params": int(n_params), "devices": mesh.size, "save_every": args.every,
              "block_steps": args.block_steps, "blocks": args.blocks,
              "step_time_s": mean, "ratio_async_vs_none": mean["async"] / mean["none"],
              "ratio_sync_vs_none": mean["sync"] / mean["none"],
              "per_block_s": times, "overrides": (MINILM if args.minilm else []) + args.overrides}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_block_s"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
