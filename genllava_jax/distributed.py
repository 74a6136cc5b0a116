"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment; a no-op for one process.

Call `initialize()` first thing in a CLI's main(), before anything touches a JAX device. Where the values come from,
first match wins:

  1. explicit: `--coordinator_address=host:port --num_processes=N --process_id=I` (absl flags), or the environment
     variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what launch/slurm.py exports);
  2. a cluster JAX detects by itself (`jax.distributed.initialize()` with no arguments): SLURM or Open MPI with more
     than one task, GKE TPU pods (TPU_WORKER_HOSTNAMES with several hosts), or `--distributed=cluster`, which
     launch/tpu_pod.py passes because a GCE TPU pod slice is known only from its metadata server;
  3. otherwise one process: nothing to do.

On CPU the cross-process collectives are gloo (set unless another implementation was chosen), and orbax's barriers go
through JAX's coordination service rather than a gloo collective.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
from absl import flags

from genllava_jax import errors

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "cluster", "off"],
    "auto: explicit coordinator flags/env, else a detected SLURM/MPI/GKE cluster, else one process; cluster: always "
    "jax.distributed.initialize() with auto-detection (GCE TPU pod slices); off: one process")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (env JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (env JAX_PROCESS_ID)")


def _flag(holder):
    return holder.value if flags.FLAGS.is_parsed() else None


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.BadValue(f"environment variable {key}={value!r} is not an integer") from None


def plan(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` ({} = let JAX detect), or None for one process."""
    env = os.environ if env is None else env
    if mode not in ("auto", "cluster", "off"):
        raise errors.BadValue(f"distributed={mode!r}: expected auto, cluster or off")
    if mode == "off":
        return None
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _int(env, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _int(env, "JAX_PROCESS_ID")
    if addr or n is not None or pid is not None:
        if n == 1:
            return None
        if not addr or n is None or pid is None:
            if mode != "cluster":  # partial settings: say what is missing rather than hang waiting for peers
                missing = [name for name, v in (("coordinator_address", addr), ("num_processes", n),
                                                ("process_id", pid)) if v is None]
                raise errors.BadValue(f"multi-host start-up needs coordinator_address, num_processes and process_id; "
                                      f"missing {missing} (flags or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                                      f"JAX_PROCESS_ID)")
        if n is not None and pid is not None and not 0 <= pid < n:
            raise errors.BadValue(f"process_id={pid} is not in [0, num_processes={n})")
        kwargs = {k: v for k, v in (("coordinator_address", addr), ("num_processes", n), ("process_id", pid))
                  if v is not None}
        if len(kwargs) == 3:
            # all given: JAX must not "detect" the rest, e.g. narrow a per-node SLURM task to GPU SLURM_LOCALID
            # (devices are narrowed only by JAX_LOCAL_DEVICE_IDS, which JAX reads itself)
            kwargs["cluster_detection_method"] = "deactivate"
        return kwargs
    if mode == "cluster":
        return {}
    # JAX's own detectors also fire for a single SLURM/MPI task, where start-up would only add a coordinator
    if "SLURM_JOB_ID" in env and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return {}
    if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return {}
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}
    return None


def initialize(mode: str | None = None, **explicit) -> bool:
    """Starts the multi-host runtime if the flags/environment ask for it; True if it did (or it already was)."""
    if jax.distributed.is_initialized():
        return True
    kwargs = plan(mode or _flag(_DISTRIBUTED) or "auto",
                  explicit.get("coordinator_address") or _flag(_COORDINATOR),
                  explicit.get("num_processes", _flag(_NUM_PROCESSES)),
                  explicit.get("process_id", _flag(_PROCESS_ID)))
    if kwargs is None:
        return False
    if jax.config.jax_cpu_collectives_implementation is None:  # CPU devices need a cross-process transport
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    if jax.default_backend() == "cpu":
        _orbax_barriers_without_collectives()
    return True


def _orbax_barriers_without_collectives() -> None:
    """Orbax's barriers through the coordination service (with a timeout) instead of a collective: a gloo
    collective fails when one process arrives more than 30 s after another, as after unequal compiles on a busy
    host."""
    import orbax.checkpoint  # noqa: F401  defines the flag

    if "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True
