"""Tests run on 8 simulated CPU devices (set before jax is imported)."""
import os
import tempfile

# The tests' programs are tiny, so the suite's time is almost all XLA compilation:
# compile with LLVM optimisation off, without the fusion emitters and in one codegen
# thread (the train step of the tiny test model compiles in ~2 s instead of ~11 s on
# the 2-core CI machine). Programs and numerics are the same HLO; only the machine code
# is less optimised. JTL_TEST_FAST_COMPILE=0 runs the tests with XLA's defaults.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_enable_fast_math=false "
                 "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if os.environ.get("JTL_TEST_FAST_COMPILE", "1") != "0":
    _flags += " " + _FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One XLA compilation cache per test session, shared by pytest-xdist workers and the
# subprocesses tests start (most tests compile the same tiny programs): the suite's
# time is mostly compilation. JAX_COMPILATION_CACHE_DIR set by the caller wins.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jtl-test-xla-cache-{_run}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


# The slowest files first, so that the workers do not end with one long test running
# alone (xdist hands tests out in collection order). Whole files move, so module-scoped
# fixtures are still built once per worker; every test still runs.
_SLOW_FILES_FIRST = ("test_sharded_parity.py", "test_multihost.py", "test_finetune.py", "test_checkpoint.py",
                     "test_fewshot.py", "test_bad_input.py", "test_cli_pretrain.py", "test_model_options.py",
                     "test_loop_policies.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return _SLOW_FILES_FIRST.index(name) if name in _SLOW_FILES_FIRST else len(_SLOW_FILES_FIRST)
    items.sort(key=rank)  # stable: tests keep their order within a file
