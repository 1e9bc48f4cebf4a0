"""The HierarchicalTopK decoder loss: public ops, backends and their configuration."""

from hsae_jax.loss.api import hierarchical_sae_loss, hierarchical_sae_prefix_sse, topk_sae_loss
from hsae_jax.loss.config import (
    FusedConfig,
    PrefixSseConfig,
    SeedBackwardConfig,
    SeedForwardConfig,
    TritonLossConfig,
)
from hsae_jax.loss.reference import prefix_sse_reference
from hsae_jax.loss.xla import XlaLossConfig

__all__ = [
    "FusedConfig",
    "PrefixSseConfig",
    "SeedBackwardConfig",
    "SeedForwardConfig",
    "TritonLossConfig",
    "XlaLossConfig",
    "hierarchical_sae_loss",
    "hierarchical_sae_prefix_sse",
    "prefix_sse_reference",
    "topk_sae_loss",
]
