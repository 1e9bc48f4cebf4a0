"""The HierarchicalTopK decoder loss: public ops, backends and their configuration."""

from hsae_jax.loss.api import (
    hierarchical_sae_loss,
    hierarchical_sae_loss_and_reconstruction,
    hierarchical_sae_prefix_sse,
    topk_sae_loss,
)
from hsae_jax.loss.config import (
    BACKWARD_WALK,
    FORWARD_WALK,
    FUSED_WALK,
    PrefixSseConfig,
    TritonLossConfig,
    WalkConfig,
    XlaLossConfig,
)
from hsae_jax.loss.reference import prefix_sse_reference

__all__ = [
    "BACKWARD_WALK",
    "FORWARD_WALK",
    "FUSED_WALK",
    "PrefixSseConfig",
    "TritonLossConfig",
    "WalkConfig",
    "XlaLossConfig",
    "hierarchical_sae_loss",
    "hierarchical_sae_loss_and_reconstruction",
    "hierarchical_sae_prefix_sse",
    "prefix_sse_reference",
    "topk_sae_loss",
]
