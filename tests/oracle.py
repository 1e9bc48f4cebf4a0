"""A float64 NumPy oracle of the decoder loss, its gradients and per-prefix SSE.

Written from the definition, independently of hsae_jax: every backend is compared to it.
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(np.asarray(x).astype(np.float32), dtype=np.float64)


def decoder_loss_oracle(indices, weight, vals, bias, target, prefix_weights=None):
    """Returns dict(loss, prefix_sse [B, K], weight, vals, bias, target, prefix_weights grads)."""
    indices = np.asarray(indices).astype(np.int64)
    weight, vals, bias, target = map(_f64, (weight, vals, bias, target))
    b, k = indices.shape
    f, d = weight.shape
    w = np.ones(k) if prefix_weights is None else _f64(prefix_weights)

    selects = (indices >= 0) & (indices < f)
    rows = np.where(selects[..., None], weight[np.clip(indices, 0, f - 1)], 0.0)  # [B, K, D]
    recon = bias + np.cumsum(vals[..., None] * rows, axis=1)
    resid = recon - target[:, None, :]
    prefix_sse = np.sum(resid**2, axis=-1)  # [B, K]
    mse = prefix_sse.sum(0) / (b * d)  # [K]
    loss = float(np.sum(w * mse) / w.sum())

    grad = 2.0 * (w / w.sum())[None, :, None] / (b * d) * resid  # d loss / d recon_k
    suffix = np.cumsum(grad[:, ::-1], axis=1)[:, ::-1]
    dweight = np.zeros((f, d))
    np.add.at(dweight, indices[selects], (vals[..., None] * suffix)[selects])
    return {
        "loss": loss,
        "prefix_sse": prefix_sse,
        "weight": dweight,
        "vals": np.sum(rows * suffix, axis=-1),
        "bias": grad.sum((0, 1)),
        "target": -grad.sum(1),
        "prefix_weights": (mse - loss) / w.sum(),
    }
