"""``topk_encode``: the TopK SAE encoder with a sparse backward.

    xc   = x - b_dec                               [B, D]
    pre  = xc @ W_enc.T + b_enc                    [B, F]  (W_enc stored [F, D])
    vals, indices = top_k(pre, K); vals = relu(vals)

Plain autodiff would push a dense [B, F] gradient through the matmul (two [B, F] x
[F, D]-sized products). Here the backward uses only the B x K selected entries: a
scatter into dW_enc and a gather for d xc (kernel or XLA), so its cost scales with K,
not F. Results equal the dense gradient (tests check it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from hsae_jax import _shapes, backends
from hsae_jax.loss.common import chunk_latents, safe_indices
from hsae_jax.topk import TopKConfig, top_k
from hsae_jax.triton_launch import kernel_module, launch

_KERNELS = "hsae_jax.encoder.kernels"


@dataclasses.dataclass(frozen=True)
class SparseEncoderConfig:
    """Launch settings of ``sparse_encoder_backward_kernel`` (and the XLA chunk size)."""

    block_b: int = 4
    block_d: int = 128
    loop_num_stages: int = 4
    num_warps: int = 4
    num_stages: int = 2
    xla_chunk: int = 4


@dataclasses.dataclass(frozen=True)
class _Encoder:
    backend: str  # "triton" | "interpret" | "xla"
    k: int
    topk_config: TopKConfig
    config: SparseEncoderConfig

    def forward(self, x, w_enc, b_enc, b_dec):
        xc = x - b_dec.astype(x.dtype)
        pre = jnp.dot(xc, w_enc.T.astype(x.dtype), preferred_element_type=jnp.float32)
        pre = pre + b_enc.astype(jnp.float32)
        values, indices = top_k(pre, self.k, backend=self.backend, config=self.topk_config)
        return jax.nn.relu(values), indices, xc

    def sparse_backward(self, indices, w_enc, dpre, xc):
        """(dW_enc [F, D] float32, d xc [B, D] float32) from dpre [B, K]."""
        if self.backend == "xla":
            return _sparse_backward_xla(indices, w_enc, dpre, xc, self.config.xla_chunk)
        b, k = indices.shape
        f, d = w_enc.shape
        cfg = self.config
        kernel = kernel_module(_KERNELS, self.backend).sparse_encoder_backward_kernel
        dweight, dxc = launch(
            kernel, indices, w_enc, dpre, xc,
            out_shape=[jax.ShapeDtypeStruct((f, d), jnp.float32),
                       jax.ShapeDtypeStruct((b, d), jnp.float32)],
            grid=(_shapes.cdiv(b, cfg.block_b), _shapes.cdiv(d, cfg.block_d)),
            backend=self.backend, zeroed_outputs=(0,), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, B=b, F=f, D=d, K=k, BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d, LOOP_NUM_STAGES=cfg.loop_num_stages)
        return dweight, dxc


def _sparse_backward_xla(indices, w_enc, dpre, xc, chunk):
    """The same sums as the kernel, as a scan over chunks of the K latents."""
    b, k = indices.shape
    f, d = w_enc.shape
    chunk = max(1, min(chunk, k))
    idx = chunk_latents(safe_indices(indices, f), chunk, f)  # padding selects no row
    dp = chunk_latents(dpre, chunk, 0.0)
    xc32 = xc.astype(jnp.float32)

    def step(carry, xs):
        dweight, dxc = carry
        idx_c, dp_c = xs
        rows = jnp.take(w_enc, idx_c, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        dxc = dxc + jnp.einsum("bc,bcd->bd", dp_c, rows)
        dweight = dweight.at[idx_c].add(dp_c[..., None] * xc32[:, None, :], mode="drop")
        return (dweight, dxc), None

    init = (jnp.zeros((f, d), jnp.float32), jnp.zeros((b, d), jnp.float32))
    (dweight, dxc), _ = jax.lax.scan(step, init, (idx, dp))
    return dweight, dxc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode(enc, x, w_enc, b_enc, b_dec):
    vals, indices, _ = enc.forward(x, w_enc, b_enc, b_dec)
    return vals, indices


def _encode_fwd(enc, x, w_enc, b_enc, b_dec):
    vals, indices, xc = enc.forward(x, w_enc, b_enc, b_dec)
    return (vals, indices), (indices, vals, xc, w_enc, b_enc, b_dec)


def _encode_bwd(enc, saved, cotangents):
    indices, vals, xc, w_enc, b_enc, b_dec = saved
    dvals, _ = cotangents
    dpre = jnp.where(vals > 0, dvals, 0).astype(jnp.float32)  # ReLU
    dweight, dxc = enc.sparse_backward(indices, w_enc, dpre, xc)
    db_enc = jnp.zeros(b_enc.shape, jnp.float32).at[indices.reshape(-1)].add(dpre.reshape(-1))
    return (
        dxc.astype(xc.dtype),
        dweight.astype(w_enc.dtype),
        db_enc.astype(b_enc.dtype),
        (-jnp.sum(dxc, axis=0)).astype(b_dec.dtype),
    )


_encode.defvjp(_encode_fwd, _encode_bwd)


def topk_encode(
    x: jax.Array,  # [B, D]
    w_enc: jax.Array,  # [F, D]
    b_enc: jax.Array,  # [F]
    b_dec: jax.Array,  # [D]
    k: int,
    *,
    backend: str = "auto",
    topk_config: TopKConfig | None = None,
    config: SparseEncoderConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """TopK encoder: (vals [B, K] float32 >= 0 sorted descending, indices [B, K] int32).

    ``x`` and ``w_enc`` set the matmul's input dtype (float32: default precision, TF32
    on NVIDIA GPUs; bfloat16: bf16 inputs); it accumulates in float32. backend
    ``"triton"`` / ``"interpret"`` / ``"xla"`` picks top-k and the sparse backward;
    ``"reference"`` is plain autodiff through the dense matmul and ``lax.top_k`` (the
    naive path); ``"auto"``: triton on a CUDA GPU, else xla. Differentiable in x,
    w_enc, b_enc and b_dec.
    """
    for name, arr, rank in (("x", x, 2), ("w_enc", w_enc, 2), ("b_enc", b_enc, 1),
                            ("b_dec", b_dec, 1)):
        if len(arr.shape) != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {tuple(arr.shape)}")
    f, d = w_enc.shape
    if x.shape[1] != d or b_enc.shape != (f,) or b_dec.shape != (d,):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)} must be [B, D={d}], b_enc "
            f"{tuple(b_enc.shape)} must be [F={f}], b_dec {tuple(b_dec.shape)} must be [D={d}]"
        )
    concrete = backends.resolve_backend(backend)
    if concrete == "reference":
        pre = jnp.dot(x - b_dec.astype(x.dtype), w_enc.T.astype(x.dtype),
                      preferred_element_type=jnp.float32) + b_enc.astype(jnp.float32)
        values, indices = jax.lax.top_k(pre, k)
        return jax.nn.relu(values), indices
    enc = _Encoder(concrete, k, topk_config or TopKConfig(), config or SparseEncoderConfig())
    return _encode(enc, x, w_enc, b_enc, b_dec)
