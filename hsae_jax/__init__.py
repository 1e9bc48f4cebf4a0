"""hsae-jax: HierarchicalTopK sparse autoencoders in JAX, with fused Triton kernels."""

from hsae_jax.backends import BACKENDS, BackendUnavailableError
from hsae_jax.encoder import SparseEncoderConfig, topk_encode
from hsae_jax.loss import (
    FusedConfig,
    TritonLossConfig,
    XlaLossConfig,
    hierarchical_sae_loss,
    hierarchical_sae_prefix_sse,
    topk_sae_loss,
)
from hsae_jax.model import HierarchicalTopKSAE, SAEConfig
from hsae_jax.topk import TopKConfig, top_k
from hsae_jax.version import __version__

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FusedConfig",
    "HierarchicalTopKSAE",
    "SAEConfig",
    "SparseEncoderConfig",
    "TopKConfig",
    "TritonLossConfig",
    "XlaLossConfig",
    "__version__",
    "hierarchical_sae_loss",
    "hierarchical_sae_prefix_sse",
    "top_k",
    "topk_encode",
    "topk_sae_loss",
]
