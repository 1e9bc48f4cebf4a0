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
for the other one afterwards raises an error that says so. Kernel modules are imported
(plain ``import`` statements) only after :func:`import_triton_for` has fixed the mode.

Every op resolves its ``backend=`` and ``config=`` arguments with :func:`resolve`, under
one rule (see its docstring).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Literal

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


def import_triton_for(backend: str):
    """Imports Triton in the mode kernel backend ``backend`` needs; returns the module."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"{backend=} does not launch Triton kernels")
    return import_triton("interpret" if backend == "interpret" else "compiled")


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def resolve(backend: Backend, config: Any, *, kernel_config: type,
            xla_config: type | None = None, argument: str = "config") -> tuple[str, Any]:
    """(concrete backend, its config) for an op's ``backend=`` and ``config=``.

    The one rule every op follows:

    - ``backend`` is one of :data:`BACKENDS`; ``"auto"`` becomes ``"triton"`` where it can
      run, else ``"xla"``. A backend that cannot run here raises
      :class:`BackendUnavailableError` saying why.
    - ``config`` is None (the backend's defaults) or an instance of the op's
      ``kernel_config`` (configures ``"triton"`` and ``"interpret"``) or ``xla_config``
      (configures ``"xla"``); anything else raises TypeError.
    - A config that does not configure the concrete backend raises TypeError, except
      under ``"auto"``, where a config for the backend auto did not pick is not used
      (code written with GPU settings still runs on a CPU). ``"reference"`` takes no
      config.

    Returns the config to use: the given one, or the defaults (``kernel_config()`` /
    ``xla_config()``), or None for ``"reference"`` and for ``"xla"`` without an
    ``xla_config`` type. ``argument`` names the config argument in error messages.
    """
    concrete = resolve_backend(backend)
    accepted = tuple(t for t in (kernel_config, xla_config) if t is not None)
    if config is not None and not isinstance(config, accepted):
        names = " or ".join(t.__name__ for t in dict.fromkeys(accepted))
        raise TypeError(f"{argument} must be a {names} (or None), got {type(config).__name__}")
    wanted = {"triton": kernel_config, "interpret": kernel_config, "xla": xla_config,
              "reference": None}[concrete]
    if config is not None and (wanted is None or not isinstance(config, wanted)):
        if backend != "auto":
            raise TypeError(f"{argument}={config!r} does not configure backend={backend!r}")
        config = None
    if config is None and wanted is not None:
        config = wanted()
    return concrete, config


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
