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

import contextlib
import itertools
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
    """Whether this process writes the run folder's files (process 0). Does not start
    JAX's backend."""
    state = _global_state()
    return state.client is None or state.process_id == 0  # one process, or process 0


EXCHANGE_TIMEOUT_S = 600  # how long a process waits for another's word before naming it
_exchanges = itertools.count()  # this process's exchanges so far: every process counts alike


def _global_state():
    """jax.distributed's state: ``client`` of the coordination service (None: one
    process), ``process_id``, ``num_processes``. Read without starting JAX's backend."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


def failures(failure: BaseException | None, timeout_s: float = EXCHANGE_TIMEOUT_S
             ) -> list[tuple[int, str]]:
    """(process index, "ErrorType: message") of every *other* process that failed, or did
    not answer within ``timeout_s``.

    Every process of a run calls this at the same points (the loop: once after start-up,
    before the run's first barrier, and at each step that logs or saves), with what stopped
    it (``failure``) or None, so a process that fails alone does not leave the others
    waiting in a collective or at a barrier: they learn who failed and why. The word goes
    through the coordination service's key-value store (jax.distributed's client), not
    through the devices, so it needs no device program and cannot hang on a collective.
    One process: ``[]`` at once (JAX's backend is not started for it).
    """
    state = _global_state()
    client = state.client
    if client is None:
        return []
    # starting JAX's backend is itself an exchange every process must join (the devices'
    # global topology): one that failed before starting it joins here
    jax.devices()
    me, count = state.process_id, state.num_processes
    exchange = next(_exchanges)
    key = "hsae/failures/{}/{}".format
    text = "" if failure is None else f"{type(failure).__name__}: {failure}"
    client.key_value_set(key(exchange, me), ("1" if failure is not None else "0") + text)
    failed = []
    for other in range(count):
        if other == me:
            continue
        try:
            word = client.blocking_key_value_get(key(exchange, other), int(timeout_s * 1000))
        except Exception as err:  # noqa: BLE001 - a timeout, or the service gone
            failed.append((other, f"no word from it within {timeout_s:g} s (it died or is "
                                  f"stuck; {type(err).__name__}: {str(err)[:200]})"))
            continue
        if word.startswith("1"):
            failed.append((other, word[1:]))
    if exchange:  # every process has read this process's word of the exchange before
        with contextlib.suppress(Exception):
            client.key_value_delete(key(exchange - 1, me))
    return failed
