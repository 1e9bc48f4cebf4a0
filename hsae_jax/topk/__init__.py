"""Exact row-wise top-k: Triton kernels, the interpreter, or ``jax.lax.top_k``."""

from hsae_jax.topk.api import top_k, top_k_mask, top_k_relu
from hsae_jax.topk.config import TopKConfig

__all__ = ["TopKConfig", "top_k", "top_k_mask", "top_k_relu"]
