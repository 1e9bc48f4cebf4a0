"""The TopK encoder with its latents split over the ``model`` axis.

Each device holds ``W_enc[F/m]`` and ``b_enc[F/m]`` (latents ``j·F/m ...`` on device j),
computes its [B, F/m] pre-activations, takes its own top K (all F/m if fewer; ``top_k``:
the Triton kernel or ``lax.top_k``) and the global top K per token is merged from the m
candidate lists (:func:`hsae_jax.parallel.collectives.merge_top_k`: an all-gather of
B x K x m values and indices). Every device then holds the same sorted (vals, indices),
with ``top_k``'s tie rule. The backward is the sparse one of
:func:`hsae_jax.encoder.topk_encode` on the pairs whose latent is in the device's block:
dW_enc and db_enc stay local, and db_dec is this block's share (the caller sums it over
the axis with :func:`~hsae_jax.parallel.collectives.grad_psum`). With m = 1 this is
``topk_encode``'s computation exactly.
"""

from __future__ import annotations

import dataclasses

import jax

from hsae_jax.encoder.api import (
    Encoder,
    by_rows,
    encoder_backward,
    scores,
    sparse_encode,
    sparse_encode_with_scores,
)
from hsae_jax.parallel.collectives import merge_top_k
from hsae_jax.parallel.mesh import Axes
from hsae_jax.topk import top_k


@dataclasses.dataclass(frozen=True)
class ShardedEncoder:
    enc: Encoder
    axes: Axes

    def offset(self, f_local: int):
        """The global index of this device's first latent."""
        return self.axes.model_index() * f_local

    def forward(self, x, w_enc, b_enc, b_dec, keep_scores: bool = False):
        """(vals, indices, xc, this block's pre-activations [B, F/m] float32 if
        ``keep_scores`` else None)."""
        xc = x - b_dec.astype(x.dtype)
        candidates = min(self.enc.k, w_enc.shape[0])  # a block may hold fewer than K

        def select(xc_rows):
            pre = scores(xc_rows, w_enc, b_enc)  # [rows, F/m]
            with jax.named_scope("top_k"):
                values, indices = top_k(pre, candidates, backend=self.enc.backend,
                                        config=self.enc.topk_config)
                if self.axes.model > 1:
                    values, indices = merge_top_k(
                        values, indices + self.offset(w_enc.shape[0]), self.enc.k)
            return values, indices, pre if keep_scores else None

        values, indices, pre = by_rows(select, xc, self.enc.config.forward_rows)
        return jax.nn.relu(values), indices, xc, pre

    def backward(self, indices, vals, dvals, xc, w_enc, b_enc, b_dec):
        """The one-device backward on this block's pairs (other blocks' latents fall out
        of range); db_dec is this block's share."""
        if self.axes.model > 1:
            indices = indices - self.offset(w_enc.shape[0])
        return encoder_backward(self.enc, indices, vals, dvals, xc, w_enc, b_enc, b_dec)


def sharded_topk_encode(enc: Encoder, axes: Axes, x, w_enc, b_enc, b_dec,
                        with_scores: bool = False):
    """(vals [B, K] float32 >= 0 sorted descending, indices [B, K] int32 global), inside
    ``shard_map``. x [B, D] and b_dec [D] whole on every device; w_enc [F/m, D] and
    b_enc [F/m] this device's block. Differentiable in w_enc, b_enc, b_dec (this device's
    share of db_dec) and x. ``with_scores``: also this block's pre-activations [B, F/m]
    float32, constant (:func:`hsae_jax.encoder.api.sparse_encode_with_scores`)."""
    if with_scores:
        return sparse_encode_with_scores(ShardedEncoder(enc, axes), x, w_enc, b_enc, b_dec)
    return sparse_encode(ShardedEncoder(enc, axes), x, w_enc, b_enc, b_dec)
