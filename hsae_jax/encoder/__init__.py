"""The TopK SAE encoder with a sparse (K, not F) backward."""

from hsae_jax.encoder.api import topk_encode
from hsae_jax.encoder.config import SparseEncoderConfig

__all__ = ["SparseEncoderConfig", "topk_encode"]
