"""Several processes (hosts, or one process per GPU): ``jax.distributed`` wiring.

Every process runs the same ``hsae train`` command; together they see one global mesh.
:func:`initialize` is called first thing in :func:`hsae_jax.train.train`:

- ``--coordinator HOST:PORT --num-processes N --process-id I``: explicit;
- ``--coordinator auto``: ``jax.distributed.initialize()`` detects SLURM, Open MPI and the
  other clusters JAX knows;
- neither: the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID`` if ``JAX_COORDINATOR_ADDRESS`` is set, else one process.

``JAX_LOCAL_DEVICE_IDS`` (read by JAX) picks the GPUs of a process when several share a
host. On CPUs the processes talk through gloo (CPU collectives), which the tests use.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def settings_from(coordinator: str | None, num_processes: int | None,
                  process_id: int | None) -> dict | None:
    """The arguments of ``jax.distributed.initialize`` for these settings and the
    environment; None: a single process."""
    if coordinator is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator = os.environ["JAX_COORDINATOR_ADDRESS"]
        num_processes = num_processes if num_processes is not None else _env_int(
            "JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT "
                             "(or auto, or $JAX_COORDINATOR_ADDRESS)")
        return None
    if coordinator == "auto":
        return {}
    if num_processes is None or process_id is None:
        raise ValueError(f"--coordinator={coordinator} needs --num-processes and --process-id "
                         "(or $JAX_NUM_PROCESSES and $JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in [0, --num-processes="
                         f"{num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the processes of a multi-process run (once per process); returns whether this
    is one. Must run before JAX touches a device."""
    args = settings_from(coordinator, num_processes, process_id)
    if args is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
    jax.distributed.initialize(**args)
    return True


def is_primary() -> bool:
    """Whether this process writes the run folder's files (process 0)."""
    return jax.process_index() == 0
