"""Which implementation runs an op: backend names, detection and lazy imports.

Backends shared by every op of hsae-jax:

- ``"triton"``: Triton kernels compiled for a CUDA GPU and launched with
  ``jax_triton.triton_call``.
- ``"interpret"``: the very same kernel functions run by Triton's CPU interpreter
  through ``jax.pure_callback`` on torch CPU tensors. For tests and debugging; slow.
- ``"xla"``: pure JAX (runs on CPU, GPU and TPU).
- ``"reference"``: the plain jnp definition the others are checked against.
- ``"auto"``: ``"triton"`` on a CUDA device with jax-triton importable, else ``"xla"``.

Triton decides once per process, when it is first imported, whether ``@triton.jit``
compiles or interprets (the ``TRITON_INTERPRET`` environment variable). hsae-jax imports
Triton lazily: the first of ``"triton"`` / ``"interpret"`` used fixes the mode, and asking
for the other one afterwards raises an error that says so.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Literal

import jax

Backend = Literal["auto", "triton", "interpret", "xla", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "interpret", "xla", "reference")
KERNEL_BACKENDS: tuple[str, ...] = ("triton", "interpret")


class BackendUnavailableError(ValueError):
    """The requested backend cannot run in this process."""


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_mode() -> str | None:
    """``"interpret"`` or ``"compiled"`` if Triton is already imported, else ``None``."""
    if "triton" not in sys.modules:
        return None
    return "interpret" if _env_interpret() else "compiled"


def import_triton(mode: str):
    """Imports Triton in ``mode`` (``"interpret"`` or ``"compiled"``); returns the module.

    Raises BackendUnavailableError if Triton is missing or was already imported in the
    other mode (Triton fixes the mode at import time).
    """
    current = triton_mode()
    if current is None:
        if mode == "interpret":
            os.environ["TRITON_INTERPRET"] = "1"
        elif _env_interpret():
            raise BackendUnavailableError(
                "backend='triton' needs compiled Triton, but TRITON_INTERPRET=1 is set in "
                "the environment: unset it before starting Python, or use "
                "backend='interpret'."
            )
    elif current != mode:
        wanted = "backend='interpret'" if mode == "interpret" else "backend='triton'"
        raise BackendUnavailableError(
            f"{wanted} is not available in this process: Triton was already imported in "
            f"{current} mode, and Triton fixes that mode when it is first imported "
            "(TRITON_INTERPRET). Run the two in separate processes."
        )
    try:
        return importlib.import_module("triton")
    except ImportError as err:  # pragma: no cover - depends on the installation
        extra = "test" if mode == "interpret" else "cuda12] or [cuda13"
        raise BackendUnavailableError(
            f"Triton is not installed: pip install 'hsae-jax[{extra}]'"
        ) from err


@functools.cache
def cuda_available() -> bool:
    """True when JAX has a CUDA device."""
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


def import_jax_triton():
    """Imports jax_triton lazily, keeping ``TRITON_CACHE_DIR`` as it was.

    jax-triton 0.3.x empties ``TRITON_CACHE_DIR`` on import, which breaks any ordinary
    Triton launch later in the process (torch-side Triton, for example).
    """
    if "jax_triton" in sys.modules:
        return sys.modules["jax_triton"]
    import_triton("compiled")
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        module = importlib.import_module("jax_triton")
    except ImportError as err:
        raise BackendUnavailableError(
            "backend='triton' needs jax-triton and a CUDA build of jaxlib "
            f"({type(err).__name__}: {err}). Install with pip install 'hsae-jax[cuda12]' "
            "(or [cuda13])."
        ) from err
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    return module


@functools.cache
def triton_available() -> bool:
    """True when the compiled Triton backend can run here (CUDA device + jax-triton)."""
    if not cuda_available() or triton_mode() == "interpret" or _env_interpret():
        return False
    try:
        import_jax_triton()
    except BackendUnavailableError:
        return False
    return True


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def resolve_backend(backend: str) -> str:
    """Maps ``backend`` to the concrete backend that will run, checking it can run here.

    Raises ValueError for an unknown name and BackendUnavailableError when the
    requested backend cannot run in this process.
    """
    validate_backend(backend)
    if backend == "auto":
        return "triton" if triton_available() else "xla"
    if backend == "triton":
        if not cuda_available():
            raise BackendUnavailableError(
                "backend='triton' needs a CUDA GPU, and JAX sees none "
                f"(devices: {jax.devices()}). Use backend='xla', or backend='interpret' "
                "to run the Triton kernels on the CPU."
            )
        import_jax_triton()
    if backend == "interpret":
        import_triton("interpret")
        try:
            importlib.import_module("torch")
        except ImportError as err:
            raise BackendUnavailableError(
                "backend='interpret' runs Triton's interpreter on torch CPU tensors: "
                "pip install torch (CPU build), or 'hsae-jax[test]'."
            ) from err
    return backend
