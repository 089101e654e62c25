"""jtl: transfer learning with transformer LMs in JAX/Flax NNX."""
import os

__version__ = "0.1.0"

# Recommended XLA:CPU flags, added before JAX starts its backends. With XLA's
# default CPU settings (dots fused into YNN fusions) a BERT train step ran at
# 0.70-0.83x Hugging Face PyTorch on our 2-core AMD EPYC host; with YNN dot
# fusion turned off the dots go to XLA's own GEMM kernels and the step ran at
# about 1.0x (DESIGN.md "Speed"; benchmarks/README.md has the measurements).
# A flag the user already set (by name) is left alone; everything else in
# XLA_FLAGS (e.g. the simulated device count set by tests) is kept: we append.
# JTL_XLA_DEFAULTS=0 turns this off. Flags reach only backends created after
# ``import jtl``; other platforms (GPU/TPU) ignore XLA:CPU flags.
RECOMMENDED_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",)
_added: list[str] = []  # what _add_recommended_xla_flags put in XLA_FLAGS (never the user's own)


def _add_recommended_xla_flags() -> None:
    if os.environ.get("JTL_XLA_DEFAULTS", "1").lower() in ("0", "false", "no"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    add = [f for f in RECOMMENDED_XLA_FLAGS if f.split("=")[0] not in flags]
    if add:
        os.environ["XLA_FLAGS"] = " ".join([flags, *add]).strip()
        _added.extend(add)


def use_xla_defaults_for_decoding() -> bool:
    """Take back the flags above, for commands that decode (generate, eval-prompted, lm-eval).

    Decoding multiplies a few rows by each weight matrix, where XLA's own dot fusion is the
    faster kernel: SmolLM2-135M decoded at 0.47x transformers at batch 8 with the training
    flag and 1.16x without it (Intel Xeon, benchmarks/results/generate*). Only flags jtl
    added are removed, and only while no XLA backend has started (they are read then).
    Returns whether XLA_FLAGS changed."""
    import jax._src.xla_bridge as xb
    if not _added or xb.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in _added)
    _added.clear()
    return True


_add_recommended_xla_flags()
