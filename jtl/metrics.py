"""FLOP counts, MFU, device peaks, and the metric writers (console, JSONL, TensorBoard).

FLOP formula (per optimizer step, training = 3x forward: backward is 2x forward)
-------------------------------------------------------------------------------
Only matmuls count (norms, softmax, embeddings gathers are ignored). Per token
and layer, forward, with D=hidden, H/K query/kv heads of size Dh, F=mlp, S=row
length:

* projections  2*D*(H + 2K)*Dh  (q, k, v)  +  2*H*Dh*D  (attention output)
* MLP          2*D*F*2, or 2*D*F*3 for a gated (SwiGLU) MLP
* attention    2*2*S*H*Dh for an encoder (every query sees all S keys); half of
               that for a causal decoder (only the lower triangle is useful)

Heads: a causal LM adds 2*D*V per token. The MLM head runs only at the masked
positions (P per row): 2*D*D (transform) + 2*D*V per prediction. Classification
heads are negligible. MFU = counted FLOPs per second / (peak FLOP/s per device
x devices).

Peak FLOP/s per device: on CPU we measure a float32 matmul with all cores (see
``measure_cpu_peak``); on GPU/TPU we use the datasheet dense bf16 number
(``DATASHEET_PEAK``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jtl.config import ModelConfig

DATASHEET_PEAK = {  # dense bf16 FLOP/s per chip
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "v100": 125e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v6": 918e12,
}


def layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d, h, k, hd, f = cfg.hidden, cfg.heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.mlp
    proj = 2 * d * (h + 2 * k) * hd + 2 * h * hd * d
    mlp = 2 * d * f * (3 if cfg.family == "llama" else 2)
    attn = 2 * 2 * seq_len * h * hd * (0.5 if cfg.causal else 1.0)
    return proj + mlp + attn


def train_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int, task: str = "mlm",
                         mlm_predictions: int = 0, freeze: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one training step on ``batch`` rows of ``seq_len`` (see module doc).

    ``freeze`` (``optim.freeze``): frozen transformer layers cost their forward pass and,
    when the embeddings below them still train, the backward pass for their inputs only
    (2x forward, not 3x); a wholly frozen backbone costs its forward pass alone."""
    from jtl.optim import is_frozen
    tokens = batch * seq_len
    passes = 3.0
    if freeze and is_frozen(("backbone", "layers", "q_w"), tuple(freeze)):
        passes = 1.0 if is_frozen(("backbone", "embed", "tokens"), tuple(freeze)) else 2.0
    fwd = tokens * cfg.layers * layer_flops_per_token(cfg, seq_len)
    head = 0.0
    if task == "clm":
        head = tokens * 2 * cfg.hidden * cfg.vocab_size
    elif task == "mlm":
        head = batch * mlm_predictions * (2 * cfg.hidden * cfg.hidden + 2 * cfg.hidden * cfg.vocab_size)
    return passes * fwd + 3.0 * head


def device_kind() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


_CPU_PEAK: float | None = None


def measure_matmul_peak(n: int = 1024, repeats: int = 8, device=None) -> float:
    """float32 matmul FLOP/s through XLA on one device (a CPU device = all host cores),
    best of ``repeats``. Not cached: benchmarks call it in the same run they time."""
    device = device or jax.devices("cpu")[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def measure_cpu_peak() -> float:
    """The host's matmul peak, measured once per process (for training-time MFU)."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        _CPU_PEAK = measure_matmul_peak()
    return _CPU_PEAK


def mesh_peak_flops(mesh) -> tuple[float, str]:
    """(peak FLOP/s of the devices of ``mesh``, where the number came from): the MFU
    denominator. On CPU every simulated device of a host shares all of its cores, so a
    mesh of 1 of 8 simulated devices has the whole host's peak, not an eighth of it
    (which let the MFU of such runs read above 100%): the host peak x processes."""
    if jax.devices()[0].platform == "cpu":
        return (measure_cpu_peak() * jax.process_count(),
                "measured float32 matmul on this host (the mesh's simulated devices share it)")
    peak, source = peak_flops_per_device()
    return peak * mesh.size, f"{source} x {mesh.size} devices"


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        # Simulated CPU devices share the host's cores: the host peak is split among them.
        return measure_cpu_peak() / len(jax.devices()), "measured float32 matmul on this host"
    kind = getattr(d, "device_kind", "").lower()
    for name, peak in DATASHEET_PEAK.items():
        if name in kind:
            return peak, f"datasheet bf16 dense peak for {kind}"
    return float("nan"), f"unknown peak for {kind}"


class MetricWriter:
    """JSONL + TensorBoard event files in the run directory; one line per write."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, fresh: bool = False):
        """``fresh``: the run starts at step 0, so an earlier run's metrics.jsonl is moved
        to metrics.<time>.jsonl (kept, never appended to); a resumed run appends."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if fresh and jax.process_index() == 0 and path.exists() and path.stat().st_size:
            old = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            path.rename(old)
            logging.getLogger("jtl").info("%s: an earlier run's metrics moved to %s", path, old.name)
        self.jsonl = open(path, "a", buffering=1)
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if jax.process_index() != 0:
            return
        clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, float, int)) or
                     hasattr(v, "dtype") else v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def progress(total: int, enabled: bool = True, desc: str = "train"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
