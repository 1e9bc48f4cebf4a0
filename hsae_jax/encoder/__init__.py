"""The TopK SAE encoder with a sparse (K, not F) backward."""

from hsae_jax.encoder.api import SparseEncoderConfig, topk_encode

__all__ = ["SparseEncoderConfig", "topk_encode"]
