"""Throughput / step time / compile time / MFU / memory of jtl's real train step.

    .venv/bin/python benchmarks/throughput.py --out benchmarks/results/cpu          # short CPU sweep
    .venv/bin/python benchmarks/throughput.py --full --out runs/bench/full          # all presets, fp32+bf16

Same as ``jtl bench throughput ...`` (see ``jtl/bench.py`` for the options)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jtl.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["throughput"] + sys.argv[1:]))
