"""``KernelSettings``: which backend runs an SAE's ops, and each op's configuration.

A runtime choice, never saved with a model: the same run folder loads on a laptop
(``"xla"``) and on a GPU (``"triton"``). The model, the training step, evaluation and
the CLI (``--backend``, ``--deterministic``) all take one of these.
"""

from __future__ import annotations

import dataclasses

from hsae_jax import backends
from hsae_jax.backends import Backend
from hsae_jax.encoder import SparseEncoderConfig
from hsae_jax.loss import TritonLossConfig, XlaLossConfig
from hsae_jax.topk import TopKConfig


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """The backend and per-op configs of an SAE's encoder, top-k and decoder loss.

    backend: ``"auto"``, ``"triton"``, ``"interpret"``, ``"xla"`` or ``"reference"``
      (see :mod:`hsae_jax.backends`), used by every op.
    loss: :class:`TritonLossConfig` or :class:`XlaLossConfig` (None: defaults).
    topk: :class:`TopKConfig` for the kernel backends' top-k (None: defaults).
    encoder: :class:`SparseEncoderConfig` (None: defaults).
    Each config follows :func:`hsae_jax.backends.resolve`'s rule: under ``"auto"`` a
    config for the backend auto did not pick is not used.
    """

    backend: Backend = "auto"
    loss: TritonLossConfig | XlaLossConfig | None = None
    topk: TopKConfig | None = None
    encoder: SparseEncoderConfig | None = None

    def __post_init__(self):
        backends.validate_backend(self.backend)
        for name, kinds in (("loss", (TritonLossConfig, XlaLossConfig)), ("topk", TopKConfig),
                            ("encoder", SparseEncoderConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kinds):
                raise TypeError(f"KernelSettings.{name} must be a "
                                f"{getattr(kinds, '__name__', 'TritonLossConfig or XlaLossConfig')}"
                                f" (or None), got {type(value).__name__}")

    @classmethod
    def create(cls, backend: Backend = "auto", *, deterministic: bool = False) -> KernelSettings:
        """Settings for ``backend``; ``deterministic``: bitwise-reproducible loss and
        gradients on the kernel backends (``TritonLossConfig(deterministic=True)``; the
        xla backend on a CPU is deterministic already, and on a GPU with XLA's
        ``--xla_gpu_deterministic_ops``, which ``hsae train --deterministic`` sets)."""
        kernels = backend in ("auto", "triton", "interpret")
        return cls(backend, loss=TritonLossConfig(deterministic=True)
                   if deterministic and kernels else None)

    @property
    def deterministic(self) -> bool:
        """Whether the loss runs on the Triton kernels' deterministic mode (the xla and
        reference backends have no such setting: XLA's flag decides for them)."""
        return isinstance(self.loss, TritonLossConfig) and self.loss.deterministic


DEFAULT_KERNELS = KernelSettings()
"""``"auto"`` with every op's defaults."""
