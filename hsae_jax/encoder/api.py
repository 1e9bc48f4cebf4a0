"""``topk_encode``: the TopK SAE encoder with a sparse backward.

    xc   = x - b_dec                               [B, D]
    pre  = xc @ W_enc.T + b_enc                    [B, F]  (W_enc stored [F, D])
    vals, indices = top_k(pre, K); vals = relu(vals)

Plain autodiff would push a dense [B, F] gradient through the matmul (two [B, F] x
[F, D]-sized products). Here the backward uses only the B x K selected entries dpre:

    dW_enc[f] = sum of dpre[b, j] * xc[b] over the pairs with indices[b, j] == f
    db_enc[f] = sum of dpre[b, j] over the same pairs
    db_dec    = -(db_enc @ W_enc)                  (= -sum_b dxc[b], without dxc)
    dx        = dxc[b] = sum_j dpre[b, j] * W_enc[indices[b, j]]

dW_enc and db_enc are segment sums over the pairs sorted by latent (one Triton kernel,
bitwise reproducible; scatter-adds on the xla backend); dx is a separate gather that XLA
drops when the caller does not differentiate with respect to x (training never does).
Results equal the dense gradient (tests check it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from hsae_jax import backends
from hsae_jax.backends import Backend
from hsae_jax.encoder.config import SparseEncoderConfig
from hsae_jax.segments import segment_row_sums
from hsae_jax.sparse_rows import chunk_latents, safe_indices, weighted_row_sum
from hsae_jax.topk import TopKConfig, top_k

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Encoder:
    """The static part of one encoder call: backend, k and configs (hashable)."""

    backend: str  # "triton" | "interpret" | "xla"
    k: int
    topk_config: TopKConfig | None  # None on the xla backend
    config: SparseEncoderConfig

    def forward(self, x, w_enc, b_enc, b_dec, keep_scores: bool = False):
        """(vals, indices, xc, the pre-activations [B, F] float32 if ``keep_scores`` else
        None)."""
        xc = x - b_dec.astype(x.dtype)

        def select(xc_rows):
            pre = scores(xc_rows, w_enc, b_enc)
            with jax.named_scope("top_k"):
                values, indices = top_k(pre, self.k, backend=self.backend,
                                        config=self.topk_config)
            return values, indices, pre if keep_scores else None

        values, indices, pre = by_rows(select, xc, self.config.forward_rows)
        return jax.nn.relu(values), indices, xc, pre

    def backward(self, indices, vals, dvals, xc, w_enc, b_enc, b_dec):
        """(dx, dw_enc, db_enc, db_dec): :func:`encoder_backward`."""
        return encoder_backward(self, indices, vals, dvals, xc, w_enc, b_enc, b_dec)

    def weight_grad(self, indices, dpre, xc, f):
        """(dW_enc [F, D], db_enc [F]) float32 from dpre [B, K] float32 and xc [B, D]. On
        the kernel backends both are per-latent sums in pair order (bitwise reproducible);
        on xla, scatter-adds (run to run the same on a CPU, not on a GPU)."""
        if self.backend == "xla":
            db_enc = jnp.zeros((f,), jnp.float32).at[safe_indices(indices, f).reshape(-1)].add(
                dpre.reshape(-1), mode="drop")
            return _weight_grad_xla(indices, dpre, xc, f, self.config.xla_chunk), db_enc
        return segment_row_sums(
            indices.reshape(-1), dpre.reshape(-1), xc, f, pairs_per_row=indices.shape[1],
            backend=self.backend, config=self.config.segment_sum, with_coef_sums=True)


def _weight_grad_xla(indices, dpre, xc, f, chunk):
    """dW_enc as a scan of scatter-adds over chunks of the K latents."""
    idx = chunk_latents(safe_indices(indices, f), chunk, f)  # padding selects no row
    dp = chunk_latents(dpre, chunk, 0.0)
    xc32 = xc.astype(jnp.float32)

    def step(dweight, xs):
        idx_c, dp_c = xs
        return dweight.at[idx_c].add(dp_c[..., None] * xc32[:, None, :], mode="drop"), None

    dweight, _ = jax.lax.scan(step, jnp.zeros((f, xc.shape[1]), jnp.float32), (idx, dp))
    return dweight


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse_encode(enc, keep_scores, x, w_enc, b_enc, b_dec):
    vals, indices, _, pre = enc.forward(x, w_enc, b_enc, b_dec, keep_scores)
    return vals, indices, pre


def sparse_encode(enc, x, w_enc, b_enc, b_dec):
    """(vals, indices) of ``enc.forward``, differentiated by ``enc.backward`` from the
    selected pairs only: ``enc`` is an :class:`Encoder` or another static object with
    those two methods (the latent-sharded one of :mod:`hsae_jax.parallel.encoder`)."""
    vals, indices, _ = _sparse_encode(enc, False, x, w_enc, b_enc, b_dec)
    return vals, indices


def sparse_encode_with_scores(enc, x, w_enc, b_enc, b_dec):
    """(vals, indices, pre): :func:`sparse_encode` and the pre-activations [B, F] float32
    the selection was taken from, constant (for AuxK, which reads the dead latents'
    columns instead of computing them again). With ``forward_rows`` set the blocks are
    put back together into the whole [B, F]: callers that keep the scores leave it
    unset."""
    vals, indices, pre = _sparse_encode(enc, True, x, w_enc, b_enc, b_dec)
    return vals, indices, jax.lax.stop_gradient(pre)


def _encode_fwd(enc, keep_scores, x, w_enc, b_enc, b_dec):
    vals, indices, xc, pre = enc.forward(x, w_enc, b_enc, b_dec, keep_scores)
    return (vals, indices, pre), (indices, vals, xc, w_enc, b_enc, b_dec)


def _encode_bwd(enc, keep_scores, saved, cotangents):
    indices, vals, xc, w_enc, b_enc, b_dec = saved
    dvals = cotangents[0]  # the indices' and the scores' cotangents are not used
    return enc.backward(indices, vals, dvals, xc, w_enc, b_enc, b_dec)


def scores(xc, w_enc, b_enc):
    """[B, F] float32 pre-activations ``xc @ w_enc.T + b_enc`` of centred inputs xc [B, D],
    the matmul in xc's dtype accumulating in float32."""
    pre = jnp.dot(xc, w_enc.T.astype(xc.dtype), preferred_element_type=jnp.float32)
    return pre + b_enc.astype(jnp.float32)


def by_rows(select, xc, rows: int | None):
    """``select(xc)`` ([B, D] -> arrays [B, ...]) on blocks of ``rows`` rows at a time
    (``lax.map``; the last block padded with zero rows, dropped from the outputs), so only
    a [rows, F] block of pre-activations exists at once; None: all rows together."""
    b = xc.shape[0]
    if rows is None or rows >= b:
        return select(xc)
    blocks = -(-b // rows)
    padded = jnp.pad(xc, ((0, blocks * rows - b), (0, 0)))
    out = jax.lax.map(select, padded.reshape(blocks, rows, xc.shape[1]))
    return jax.tree.map(lambda o: o.reshape(blocks * rows, *o.shape[2:])[:b], out)


def encoder_backward(enc, indices, vals, dvals, xc, w_enc, b_enc, b_dec):
    """(dx, dw_enc, db_enc, db_dec) of the encoder from dvals [B, K], each in its primal's
    dtype. ``w_enc`` [F, D] may be a block of the latents: an index outside [0, F) is a
    latent another block holds and adds nothing here (db_dec is then this block's share)."""
    dpre = jnp.where(vals > 0, dvals, 0).astype(jnp.float32)  # ReLU
    f = w_enc.shape[0]
    dweight, db_enc = enc.weight_grad(indices, dpre, xc, f)
    db_dec = -jnp.dot(db_enc, w_enc.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    # dx: XLA drops this gather unless the caller differentiates with respect to x
    dxc = weighted_row_sum(w_enc, indices, dpre, enc.config.xla_chunk,
                           jnp.zeros(xc.shape, jnp.float32))
    return (
        dxc.astype(xc.dtype),
        dweight.astype(w_enc.dtype),
        db_enc.astype(b_enc.dtype),
        db_dec.astype(b_dec.dtype),
    )


_sparse_encode.defvjp(_encode_fwd, _encode_bwd)


def topk_encode(
    x: jax.Array,  # [B, D]
    w_enc: jax.Array,  # [F, D]
    b_enc: jax.Array,  # [F]
    b_dec: jax.Array,  # [D]
    k: int,
    *,
    backend: Backend = "auto",
    topk_config: TopKConfig | None = None,
    config: SparseEncoderConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """TopK encoder: (vals [B, K] float32 >= 0 sorted descending, indices [B, K] int32).

    ``x`` and ``w_enc`` set the matmul's input dtype (float32: default precision, TF32
    on NVIDIA GPUs; bfloat16: bf16 inputs); it accumulates in float32. backend
    ``"triton"`` / ``"interpret"`` / ``"xla"`` picks top-k and the sparse backward;
    ``"reference"`` is plain autodiff through the dense matmul and ``lax.top_k`` (the
    naive path); ``"auto"``: triton on a CUDA GPU, else xla. Differentiable in x,
    w_enc, b_enc and b_dec. ``topk_config`` configures the top-k of the kernel backends,
    ``config`` (:class:`SparseEncoderConfig`) the backward of every backend but
    ``"reference"``.
    """
    for name, arr, rank in (("x", x, 2), ("w_enc", w_enc, 2), ("b_enc", b_enc, 1),
                            ("b_dec", b_dec, 1)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        if len(arr.shape) != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {tuple(arr.shape)}")
        if jnp.dtype(arr.dtype) not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {jnp.dtype(arr.dtype)}; expected float32, "
                            "bfloat16 or float16")
    f, d = w_enc.shape
    if x.shape[1] != d or b_enc.shape != (f,) or b_dec.shape != (d,):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)} must be [B, D={d}], b_enc "
            f"{tuple(b_enc.shape)} must be [F={f}], b_dec {tuple(b_dec.shape)} must be [D={d}]"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= f:
        raise ValueError(f"k={k!r} must be an int in [1, F={f}] (w_enc.shape={(f, d)})")
    if backends.resolve_backend(backend) == "reference" and config is not None:
        raise TypeError(f"config={config!r} does not configure backend='reference' (dense "
                        "autodiff)")
    enc = make_encoder(k, backend=backend, topk_config=topk_config, config=config)
    if backends.resolve_backend(backend) == "reference":
        pre = jnp.dot(x - b_dec.astype(x.dtype), w_enc.T.astype(x.dtype),
                      preferred_element_type=jnp.float32) + b_enc.astype(jnp.float32)
        values, indices = jax.lax.top_k(pre, k)
        return jax.nn.relu(values), indices
    return sparse_encode(enc, x, w_enc, b_enc, b_dec)


def make_encoder(k: int, *, backend: Backend = "auto", topk_config: TopKConfig | None = None,
                 config: SparseEncoderConfig | None = None) -> Encoder:
    """The :class:`Encoder` of :func:`topk_encode`'s sparse path for these arguments,
    resolved by :func:`hsae_jax.backends.resolve` (``"reference"`` gets the ``"xla"``
    encoder, ``lax.top_k`` and the scatter-add backward, configured by ``config``)."""
    if backends.resolve_backend(backend) == "reference":
        if topk_config is not None:
            raise TypeError(f"topk_config={topk_config!r} does not configure "
                            "backend='reference' (lax.top_k)")
        _, config = backends.resolve("xla", config, kernel_config=SparseEncoderConfig,
                                     xla_config=SparseEncoderConfig)
        return Encoder("xla", k, None, config)
    concrete, config = backends.resolve(backend, config, kernel_config=SparseEncoderConfig,
                                        xla_config=SparseEncoderConfig)
    _, topk_config = backends.resolve(backend, topk_config, kernel_config=TopKConfig,
                                      argument="topk_config")
    return Encoder(concrete, k, topk_config, config)
