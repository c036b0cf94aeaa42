"""Multi-host start-up: `jax.distributed` from arguments or the environment.

Every process of a multi-host run calls `initialize()` once, before any
other JAX call, with the same coordinator address and process count and its
own process id:

    JAXREP_COORDINATOR=host0:12345 JAXREP_NUM_PROCESSES=2 JAXREP_PROCESS_ID=0 \
        python -m jaxrep.simulate ...      # and PROCESS_ID=1 on the other host

Afterwards `jax.devices()` lists the devices of every process, and a mesh
from `jaxrep.runtime.mesh.make_mesh()` spans them all. With one process (or no
settings at all) `initialize` does nothing, so single-host code is unchanged.
On managed clusters (Cloud TPU, SLURM, Open MPI) JAX can detect the settings
itself: pass `auto=True`.

CPU processes exchange collectives through gloo (the CPU collectives
implementation of jaxlib); it is selected here when nothing else is.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from jaxrep.core.errors import require

ENV_COORDINATOR = "JAXREP_COORDINATOR"
ENV_NUM_PROCESSES = "JAXREP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXREP_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXREP_LOCAL_DEVICE_IDS"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    require(False, name, f"must be an integer, got {value!r}")
  return None


def settings(coordinator_address: Optional[str] = None,
             num_processes: Optional[int] = None,
             process_id: Optional[int] = None) -> tuple:
  """(coordinator_address, num_processes, process_id), arguments first,
  then the JAXREP_* environment variables, validated."""
  if coordinator_address is None:
    coordinator_address = os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if num_processes is not None:
    require(isinstance(num_processes, int) and num_processes >= 1,
            "num_processes", f"must be an integer >= 1, got "
            f"{num_processes!r}")
  if num_processes is not None and num_processes > 1:
    require(bool(coordinator_address), "coordinator_address",
            f"a run of {num_processes} processes needs the coordinator's "
            f"host:port (argument or {ENV_COORDINATOR})")
    require(":" in str(coordinator_address), "coordinator_address",
            f"must be host:port, got {coordinator_address!r}")
    require(isinstance(process_id, int) and 0 <= process_id < num_processes,
            "process_id", f"must be an integer in [0, {num_processes}) "
            f"(argument or {ENV_PROCESS_ID}), got {process_id!r}")
  return coordinator_address, num_processes, process_id


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids=None, auto: bool = False,
               timeout_seconds: int = 300) -> bool:
  """Starts `jax.distributed` for a multi-process run; no-op otherwise.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service;
      None reads JAXREP_COORDINATOR.
    num_processes: processes in the run; None reads JAXREP_NUM_PROCESSES.
    process_id: this process, in [0, num_processes); None reads
      JAXREP_PROCESS_ID.
    local_device_ids: devices of this process to use (default: all; env
      JAXREP_LOCAL_DEVICE_IDS as "0,1").
    auto: let JAX detect the cluster (TPU pods, SLURM, MPI) when nothing is
      set.
    timeout_seconds: how long to wait for every process to join.

  Returns:
    True if `jax.distributed` was initialized (now or before), False for a
    single-process run.

  Raises:
    ConfigError: inconsistent settings (named field).
  """
  if jax.distributed.is_initialized():
    return True
  address, count, pid = settings(coordinator_address, num_processes,
                                 process_id)
  if count is None and auto:
    jax.distributed.initialize(initialization_timeout=timeout_seconds)
    return True
  if count is None or count == 1:
    return False
  if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
    local_device_ids = [int(v) for v in
                        os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=count, process_id=pid,
                             local_device_ids=local_device_ids,
                             initialization_timeout=timeout_seconds)
  return True


def shutdown() -> None:
  """Leaves the distributed run (no-op if not initialized)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def is_coordinator() -> bool:
  """True in process 0 (the one that writes results)."""
  return jax.process_index() == 0
