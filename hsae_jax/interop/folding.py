"""The one scale-folding rule every export uses, and the TopK SAE all targets compute.

An hsae-jax run works in a scaled space: raw activations x [B, D] are multiplied by the
scalar ``input_scale`` s (chosen so that E||s x||^2 = D), encoded, decoded, and the
reconstruction is divided by s. The other libraries have no such scalar: their TopK SAE
("apply b_dec to the input", float32) is

    pre  = (x - b_dec') @ W_enc'.T + b_enc'          [B, F]   (W_enc' stored [F, D] here)
    vals, idx = top-k of pre, then ReLU                         (k = the exported budget)
    x_hat = b_dec' + sum_j vals_j W_dec'[idx_j]      [B, D]

Since (s x - b_dec) @ W_enc.T = (x - b_dec / s) @ (s W_enc).T and
(b_dec + sum_j v_j W_dec[idx_j]) / s = b_dec / s + sum_j v_j (W_dec[idx_j] / s), the
exact fold is

    W_enc' = s * W_enc      b_enc' = b_enc      W_dec' = W_dec / s      b_dec' = b_dec / s

It keeps hsae-jax's latent activations (vals) unchanged and selects the same latents;
the price is that decoder rows have norm 1/s instead of 1. (dictionary_learning's own
``scale_biases`` fold is the other choice, unit decoder rows and activations scaled by
1/s; we keep the activations, so values line up with hsae-jax's and with the run's
metrics.) The fold is computed in float64 and rounded once to float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FOLDING_RULE = ("W_enc' = s*W_enc, b_enc' = b_enc, W_dec' = W_dec/s, b_dec' = b_dec/s "
                "(s = input_scale; activations unchanged, decoder rows have norm 1/s)")


@dataclasses.dataclass(frozen=True)
class FoldedSAE:
    """A TopK SAE on raw activations, float32 numpy arrays (F latents, D dims).

    w_enc [F, D] (one row per latent), b_enc [F], w_dec [F, D], b_dec [D]. Each format
    module lays these out the way its library wants (transposes, key names).
    """

    w_enc: np.ndarray
    b_enc: np.ndarray
    w_dec: np.ndarray
    b_dec: np.ndarray

    @property
    def d_model(self) -> int:
        return self.w_enc.shape[1]

    @property
    def n_latents(self) -> int:
        return self.w_enc.shape[0]


def fold_input_scale(params: dict, input_scale: float) -> FoldedSAE:
    """hsae-jax ``params`` (W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D]) and its
    ``input_scale`` s -> the equivalent SAE on raw activations (see the module doc)."""
    s = float(input_scale)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"input_scale={s} must be a finite number > 0")
    w_enc, b_enc, w_dec, b_dec = (np.asarray(params[n], np.float64)
                                  for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    f, d = w_enc.shape
    if b_enc.shape != (f,) or w_dec.shape != (f, d) or b_dec.shape != (d,):
        raise ValueError(f"params do not fit W_enc [F={f}, D={d}]: b_enc {b_enc.shape}, "
                         f"W_dec {w_dec.shape}, b_dec {b_dec.shape}")
    return FoldedSAE(
        w_enc=(w_enc * s).astype(np.float32),
        b_enc=b_enc.astype(np.float32),
        w_dec=(w_dec / s).astype(np.float32),
        b_dec=(b_dec / s).astype(np.float32),
    )


def topk_sae_reference(sae: FoldedSAE, x: np.ndarray, k: int):
    """The target libraries' TopK SAE in float64 numpy, for checks.

    x [B, D] -> (acts [B, F] float64, dense, k or fewer non-zeros per row; x_hat [B, D]).
    Ties at the k-th value are broken towards the lower latent index.
    """
    x = np.asarray(x, np.float64)
    pre = (x - sae.b_dec) @ sae.w_enc.T.astype(np.float64) + sae.b_enc
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0.0), 1)
    return acts, sae.b_dec + acts @ sae.w_dec.astype(np.float64)
