"""Small builders shared by the core tests."""
import numpy as np

from jtl import config


def tiny_cfg(kind="mlm", **overrides):
    family = {"mlm": "bert", "clm": "llama"}.get(kind, "bert")
    base = {"model.family": family, "model.vocab_size": 128, "model.hidden": 32, "model.layers": 2,
            "model.heads": 4, "model.mlp": 64, "model.max_len": 32, "model.dropout": 0.0,
            "model.attention_dropout": 0.0, "data.seq_len": 16, "task.kind": kind,
            "train.batch_size": 16, "optim.lr": 1e-2, "optim.warmup_steps": 0}
    if family == "llama":
        base.update({"model.kv_heads": 2, "model.norm_eps": 1e-5})
    base.update(overrides)
    return config.Config().replace(**base)


def lm_batch(kind, batch=16, seq=16, vocab=128, seed=0):
    """Synthetic packed rows: two documents per row, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        a = int(rng.integers(3, seq - 4))
        b = int(rng.integers(a + 2, seq + 1))
        seg[r, :a], seg[r, a:b] = 1, 2
        pos[r, :a], pos[r, a:b] = np.arange(a), np.arange(b - a)
    ids[seg == 0] = 0
    out = {"input_ids": ids, "segment_ids": seg, "positions": pos}
    if kind == "mlm":
        out["mlm_eligible"] = seg > 0
    else:
        tgt = np.roll(ids, -1, axis=1)
        w = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
        w[:, -1] = 0
        out.update(targets=tgt, loss_weights=w)
    return out
