"""hsae-jax: HierarchicalTopK sparse autoencoders in JAX, with fused Triton kernels."""

from hsae_jax.backends import BACKENDS, BackendUnavailableError
from hsae_jax.loss import (
    FusedConfig,
    TritonLossConfig,
    XlaLossConfig,
    hierarchical_sae_loss,
    hierarchical_sae_prefix_sse,
    topk_sae_loss,
)
from hsae_jax.version import __version__

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FusedConfig",
    "TritonLossConfig",
    "XlaLossConfig",
    "__version__",
    "hierarchical_sae_loss",
    "hierarchical_sae_prefix_sse",
    "topk_sae_loss",
]
