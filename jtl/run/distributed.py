"""Multi-process start-up: ``jax.distributed`` once, before any other JAX call.

Every host of a TPU pod slice or GPU cluster runs the same ``jtl train`` command;
JAX's multi-controller runtime joins them into one set of global devices. How the
processes find each other (``start``), in this order:

1. ``distributed.coordinator`` / ``num_processes`` / ``process_id`` config keys, else
   the ``JTL_COORDINATOR`` / ``JTL_NUM_PROCESSES`` / ``JTL_PROCESS_ID`` environment
   variables (``jtl launch`` sets these; ``JAX_COORDINATOR_ADDRESS`` also counts);
2. a cluster JAX detects by itself: Slurm (``srun``), Open MPI (``mpirun``), Cloud TPU VMs;
3. otherwise the run is a single process and ``jax.distributed`` is never called.

``distributed.enabled=true`` forces step 2 (e.g. Kubernetes with ``jax[k8s]``),
``false`` forces a single process.

What multi-process runs do differently (the rest of jtl reads ``jax.process_index()``):
process 0 alone writes config.yaml, tokenizer/, metrics.jsonl, TensorBoard events,
summary.json and the console bar; every process reads its share of each global batch
and takes part in Orbax saves, so the run directory must be on a filesystem every host
sees. A process that fails logs its traceback and exits at once (``fail_fast``) rather
than waiting in JAX's shutdown barrier; the others are then ended by JAX's heartbeat
check within about ``distributed.heartbeat_timeout`` seconds.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

from jtl.config import ConfigError, DistributedConfig

log = logging.getLogger("jtl")

ENV_COORDINATOR, ENV_NUM, ENV_ID = "JTL_COORDINATOR", "JTL_NUM_PROCESSES", "JTL_PROCESS_ID"


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def _cluster() -> str | None:
    """The cluster JAX would detect from the environment, when it has several processes."""
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open mpi"
    try:
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm
    except ImportError:  # pragma: no cover - a JAX without the module
        running_in_cloud_tpu_vm = False
    if running_in_cloud_tpu_vm:
        return "cloud tpu"
    return None


def plan(d: DistributedConfig) -> dict | None:
    """The arguments ``jax.distributed.initialize`` gets, or None for a single process."""
    if d.enabled is False:
        return None
    coordinator = d.coordinator or os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = d.num_processes if d.num_processes is not None else _env_int(ENV_NUM)
    pid = d.process_id if d.process_id is not None else _env_int(ENV_ID)
    timeouts = {"initialization_timeout": d.initialization_timeout,
                "heartbeat_timeout_seconds": d.heartbeat_timeout,
                "shutdown_timeout_seconds": d.shutdown_timeout}
    if coordinator:
        if num is None or pid is None:
            missing = [k for k, v in (("distributed.num_processes", num), ("distributed.process_id", pid))
                       if v is None]
            raise ConfigError(f"distributed.coordinator={coordinator} is set but {' and '.join(missing)} "
                              f"is not (config key, or ${ENV_NUM} / ${ENV_ID})")
        if not 0 <= pid < num:
            raise ConfigError(f"process id {pid} is outside [0, {num}) processes")
        if num == 1:
            return None
        return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid, **timeouts,
                "_how": f"coordinator {coordinator}"}
    if num is not None and num > 1:
        raise ConfigError(f"{num} processes requested but no coordinator: set distributed.coordinator "
                          f"(host:port of process 0) or ${ENV_COORDINATOR}")
    cluster = _cluster()
    if cluster is None and not d.enabled:
        return None
    return {**timeouts, "_how": f"{cluster or 'cluster'} auto-detection"}


def start(d: DistributedConfig) -> bool:
    """Join the other processes of this run (see the module docstring); True when the
    run is multi-process. Call it before anything else touches JAX."""
    import jax
    args = plan(d)
    if args is None:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    how = args.pop("_how")
    where = args.get("coordinator_address", "the detected coordinator")
    log.info("joining a multi-process run (%s): waiting up to %d s for %s processes at %s", how,
             args["initialization_timeout"], args.get("num_processes", "all"), where)
    # A peer that never arrives aborts this process from C++ after initialization_timeout
    # (no Python exception); say beforehand what that abort means.
    print(f"jtl: process {args.get('process_id', '?')}: if the run does not start within "
          f"{args['initialization_timeout']} s (distributed.initialization_timeout), a process "
          f"did not reach the coordinator {where}: check that all {args.get('num_processes', '')} "
          f"processes were started with the same coordinator", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:
        raise ConfigError(f"jax.distributed could not start ({how}): {e}") from None
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def multi_process() -> bool:
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (a no-op for one process): after process 0 changed files
    the others are about to read."""
    if multi_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def fail_fast(code: int) -> None:
    """End a failing process of a multi-process run now: its traceback is already logged;
    waiting in JAX's shutdown barrier would hold every process for shutdown_timeout."""
    import jax
    print(f"jtl: process {jax.process_index()} of {jax.process_count()} failed (exit code {code}); "
          f"the other processes stop within about distributed.heartbeat_timeout seconds. Fix the "
          f"error and rerun the same command: it resumes from the last checkpoint.",
          file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report(exc: BaseException) -> None:
    traceback.print_exception(exc, file=sys.stderr)
