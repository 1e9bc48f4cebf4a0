"""Turning another library's TopK SAE weights into a :class:`HierarchicalTopKSAE`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.model import HierarchicalTopKSAE, SAEConfig


def build_model(params: dict, k: int, hsae_meta: dict | None, objective: str | None,
                backend: str) -> HierarchicalTopKSAE:
    """params (W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D], any float dtype) at
    budget k -> a float32 model with input_scale 1 and SAEConfig(k=k).

    ``objective`` None: ``"hierarchical"`` when ``hsae_meta`` (the ``hsae_jax`` entry an
    export writes) says the SAE came from a hierarchical hsae-jax run, else ``"topk"``.
    """
    f, d = np.shape(params["W_enc"])
    if objective is None:
        objective = "topk"
        if isinstance(hsae_meta, dict) and hsae_meta.get("objective") == "hierarchical":
            objective = "hierarchical"
    if not 1 <= k <= f:
        raise ValueError(f"the source SAE has k={k}; it must be in [1, n_latents={f}]")
    cfg = SAEConfig(d_model=d, n_latents=f, k=k, objective=objective)
    arrays = {n: jnp.asarray(np.asarray(params[n], np.float32))
              for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    stats = {"input_scale": jnp.float32(1.0),
             "tokens_since_fired": jnp.zeros((f,), jnp.int32)}
    return HierarchicalTopKSAE.from_arrays(cfg, arrays, stats, KernelSettings.create(backend))
