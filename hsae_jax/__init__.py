"""hsae-jax: HierarchicalTopK sparse autoencoders in JAX, with fused Triton kernels."""

from hsae_jax.backends import BACKENDS, Backend, BackendUnavailableError
from hsae_jax.encoder import SparseEncoderConfig, topk_encode
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.loss import (
    PrefixSseConfig,
    TritonLossConfig,
    WalkConfig,
    XlaLossConfig,
    hierarchical_sae_loss,
    hierarchical_sae_prefix_sse,
    topk_sae_loss,
)
from hsae_jax.model import HierarchicalTopKSAE, SAEConfig
from hsae_jax.segments import SegmentSumConfig
from hsae_jax.topk import TopKConfig, top_k
from hsae_jax.version import __version__

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "HierarchicalTopKSAE",
    "KernelSettings",
    "PrefixSseConfig",
    "SAEConfig",
    "SegmentSumConfig",
    "SparseEncoderConfig",
    "TopKConfig",
    "TritonLossConfig",
    "WalkConfig",
    "XlaLossConfig",
    "__version__",
    "hierarchical_sae_loss",
    "hierarchical_sae_prefix_sse",
    "top_k",
    "topk_encode",
    "topk_sae_loss",
]
