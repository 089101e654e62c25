"""Data vs FSDP vs tensor vs mixed meshes on 1-8 simulated CPU devices
(per-device state bytes, activation/temp memory, FLOPs, collective traffic from
the compiled HLO), and the ahead-of-time analysis of a mesh bigger than the machine.

    .venv/bin/python benchmarks/scaling.py --preset minilm-l6 --devices 1,2,4,8 --out benchmarks/results/cpu
    .venv/bin/python benchmarks/scaling.py aot --preset llama-7b --mesh 8,4,2 --out benchmarks/results/cpu/aot-llama-7b

Same as ``jtl bench scaling ...`` / ``jtl bench aot ...``. The simulated
device count is set here before JAX starts (8 unless XLA_FLAGS names one)."""
import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jtl.bench import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv[:1] == ["aot"] else ["scaling"] + argv))
