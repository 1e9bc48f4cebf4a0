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


START_MESSAGE_BYTES = 2048  # of each process's start-up failure, as gathered


def start_failures(failure: BaseException | None) -> list[tuple[int, str]]:
    """(process index, "ErrorType: message") of every process that could not start.

    Every process of a run calls this exactly once, after its own start-up (process 0:
    claiming the run folder and checking its disk; every process: opening its data) and
    before the run's first collective (orbax's barriers, the step): ``failure`` is what
    stopped this process, or None. So a process that fails alone does not leave the
    others waiting at a barrier until they time out: they learn who failed and why. One
    process: ``[]`` or its own failure, without any communication.
    """
    text = "" if failure is None else f"{type(failure).__name__}: {failure}"
    if jax.process_count() == 1:
        return [] if failure is None else [(0, text)]
    import numpy as np
    from jax.experimental import multihost_utils

    row = np.zeros(START_MESSAGE_BYTES, np.uint8)
    row[0] = failure is not None
    encoded = text.encode("utf-8", errors="replace")[:START_MESSAGE_BYTES - 1]
    row[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))  # [processes, bytes]
    return [(index, bytes(r[1:]).rstrip(b"\0").decode("utf-8", errors="replace"))
            for index, r in enumerate(rows) if r[0]]
