"""XLA's own run-to-run determinism on a GPU, which a ``--deterministic`` run also needs.

The kernels of a deterministic run add nothing with float atomics
(``KernelSettings.create(deterministic=True)``), but XLA's part of the step can still vary
between processes: a float scatter-add with repeated indices uses atomics on a GPU, and
its autotuner may pick a different matmul algorithm in another process. XLA's flag
``--xla_gpu_deterministic_ops=true`` rules both out. XLA reads ``XLA_FLAGS`` once, when
JAX starts its first backend, so :func:`request` adds the flag only before that; the
trainer calls it first thing for a deterministic run (``hsae train --deterministic``).
A program that starts JAX itself before training sets ``XLA_FLAGS`` itself.
"""

from __future__ import annotations

import os

FLAG = "--xla_gpu_deterministic_ops=true"


def _flag_set(flags: str) -> bool:
    values = [f.split("=", 1)[1].lower() if "=" in f else "true" for f in flags.split()
              if f.split("=", 1)[0] == FLAG.split("=", 1)[0]]
    return bool(values) and values[-1] in ("true", "1")


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def request(log=print) -> bool:
    """Adds :data:`FLAG` to ``XLA_FLAGS`` unless a backend has started; returns whether
    XLA runs (or will run) with it. When it is too late and JAX runs on a GPU, says so
    through ``log`` (a CPU is deterministic without the flag)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _flag_set(flags):
        return True
    if not _backends_started():
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
        return True
    import jax

    if jax.default_backend() == "gpu":
        log(f"warning: a deterministic run, but JAX started before {FLAG} could be added "
            "to XLA_FLAGS: XLA's scatters and matmul autotuning may differ between "
            f"processes. Start the program with XLA_FLAGS='{FLAG}'.")
    return False
