"""The public decoder-loss ops and the custom_vjp every fast backend sits behind."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import backends
from hsae_jax.backends import Backend
from hsae_jax.loss.config import TritonLossConfig, XlaLossConfig
from hsae_jax.loss.prefix_weights import combine_prefix_sse, normalized_prefix_weights
from hsae_jax.loss.reference import prefix_sse_reference
from hsae_jax.loss.triton_loss import TritonLoss
from hsae_jax.loss.validation import check_loss_inputs
from hsae_jax.loss.xla import XlaLoss

LossConfig = TritonLossConfig | XlaLossConfig


def _implementation(backend: Backend, config: LossConfig | None):
    """The implementation object for ``backend`` and ``config`` (None: reference)."""
    concrete, config = backends.resolve(backend, config, kernel_config=TritonLossConfig,
                                        xla_config=XlaLossConfig)
    if concrete == "reference":
        return None
    if concrete in backends.KERNEL_BACKENDS:
        return TritonLoss(concrete, config)
    return XlaLoss(config)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-differentiable, hashable part of one call: implementation and dtypes."""

    impl: Any
    weight_dtype: np.dtype
    vals_dtype: np.dtype
    bias_dtype: np.dtype
    target_dtype: np.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(static, indices, weight, vals, bias, target, prefix_weights):
    """(loss, [B, D] float32 final reconstruction); the reconstruction is not
    differentiated (its cotangent is dropped: callers stop its gradient)."""
    coef = _coefficients(prefix_weights, indices.shape[0], weight.shape[1])
    loss_rows, final_recon = static.impl.value(indices, weight, vals, bias, target, coef)
    return jnp.sum(loss_rows), final_recon


def _coefficients(prefix_weights, b, d):
    """[K] float32 d loss / d (squared error of one element of prefix k)."""
    return normalized_prefix_weights(prefix_weights, prefix_weights.shape[0]) / (b * d)


def _loss_fwd(static, indices, weight, vals, bias, target, prefix_weights):
    coef = _coefficients(prefix_weights, indices.shape[0], weight.shape[1])
    loss_rows, residuals, final_recon = static.impl.forward(indices, weight, vals, bias,
                                                            target, coef)
    inputs = (indices, weight, vals, bias, target)
    return (jnp.sum(loss_rows), final_recon), (residuals, coef, inputs, prefix_weights)


def _loss_bwd(static, saved, cotangents):
    cotangent, _ = cotangents  # the reconstruction's: zero wherever its gradient is stopped
    residuals, coef, inputs, prefix_weights = saved
    dweight, dvals, resid_sum = static.impl.backward(residuals, coef, cotangent)

    def prefix_loss(w):  # the loss as a function of the prefix weights alone
        sse = static.impl.prefix_sse(*inputs)  # only computed if this gradient is used
        return combine_prefix_sse(sse, normalized_prefix_weights(w, w.shape[0]),
                                  inputs[1].shape[1])

    _, prefix_vjp = jax.vjp(prefix_loss, prefix_weights)
    (dprefix,) = prefix_vjp(cotangent)
    return (
        None,
        dweight.astype(static.weight_dtype),
        dvals.astype(static.vals_dtype),
        jnp.sum(resid_sum, axis=0).astype(static.bias_dtype),
        (-resid_sum).astype(static.target_dtype),
        dprefix.astype(prefix_weights.dtype),
    )


_loss.defvjp(_loss_fwd, _loss_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _prefix_sse(impl, indices, weight, vals, bias, target):
    return impl.prefix_sse(indices, weight, vals, bias, target)


@_prefix_sse.defjvp
def _prefix_sse_jvp(impl, primals, tangents):
    """The kernels' values; derivatives (any order, forward or reverse) from the xla
    implementation, which computes the same function."""
    indices = primals[0]

    def xla(weight, vals, bias, target):
        return XlaLoss().prefix_sse(indices, weight, vals, bias, target)

    _, tangent = jax.jvp(xla, primals[1:], tangents[1:])
    return _prefix_sse(impl, *primals), tangent


def hierarchical_sae_loss(
    indices: jax.Array,  # [B, K] int32/int64
    weight: jax.Array,  # [F, D]
    vals: jax.Array,  # [B, K]
    bias: jax.Array,  # [D]
    target: jax.Array,  # [B, D]
    *,
    prefix_weights: jax.Array | None = None,  # [K]
    backend: Backend = "auto",
    config: LossConfig | None = None,
) -> jax.Array:
    """HierarchicalTopK decoder loss: the mean squared error of every prefix reconstruction.

    With ``recon_k = bias + sum_{j<=k} vals[:, j, None] * weight[indices[:, j]]`` for
    k = 1..K, returns the float32 scalar

        sum_k w_k * mean_{b,d}((recon_k - target)^2) / sum_k w_k

    where ``w = prefix_weights`` (None: all ones, which is the seed's loss, the mean over
    B x K x D). A one-hot ``w`` on the last position is the plain TopK loss; weight on a
    few positions trains for those budgets only.

    Args:
      indices: [B, K] int32 or int64, the selected latents of each row, in order.
        An index outside [0, F) selects no row: it contributes nothing, its ``vals``
        gradient is 0 and the weight gradient gets nothing from it.
      weight: [F, D] decoder rows; float32, bfloat16 or float16.
      vals: [B, K] latent values; float32, bfloat16 or float16.
      bias: [D] decoder bias; float32, bfloat16 or float16.
      target: [B, D] the activations to reconstruct; float32, bfloat16 or float16.
      prefix_weights: optional [K] non-negative float weights of the K prefix losses,
        with a positive sum (checked when the values are known; under ``jax.jit`` weights
        summing to 0 give a loss of 0, never NaN).
      backend: ``"auto"``, ``"triton"``, ``"interpret"``, ``"xla"`` or ``"reference"``
        (see :mod:`hsae_jax.backends`).
      config: a :class:`TritonLossConfig` or :class:`XlaLossConfig` for that backend.

    Differentiable (``jax.grad``, ``jax.value_and_grad``, under ``jax.jit``) with respect
    to weight, vals, bias, target and prefix_weights; each gradient has its primal's
    dtype. All arithmetic accumulates in float32.
    """
    return _hierarchical(indices, weight, vals, bias, target, prefix_weights, backend, config,
                         with_reconstruction=False)


def hierarchical_sae_loss_and_reconstruction(
    indices: jax.Array,  # [B, K] int32/int64
    weight: jax.Array,  # [F, D]
    vals: jax.Array,  # [B, K]
    bias: jax.Array,  # [D]
    target: jax.Array,  # [B, D]
    *,
    prefix_weights: jax.Array | None = None,  # [K]
    backend: Backend = "auto",
    config: LossConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(:func:`hierarchical_sae_loss`, recon_K): the loss and the full reconstruction
    ``bias + sum_{j<=K} vals[:, j, None] * weight[indices[:, j]]`` [B, D] float32, which
    the kernels compute anyway (the fused kernel writes it once). The reconstruction is a
    constant (``jax.lax.stop_gradient``): AuxK's residual ``target - recon_K`` comes from
    it without a second gather of the K rows. Arguments as :func:`hierarchical_sae_loss`;
    the loss is the same value, with the same gradients.
    """
    return _hierarchical(indices, weight, vals, bias, target, prefix_weights, backend, config,
                         with_reconstruction=True)


def _hierarchical(indices, weight, vals, bias, target, prefix_weights, backend, config, *,
                  with_reconstruction: bool):
    """loss, or (loss, recon_K) ``with_reconstruction``."""
    check_loss_inputs(indices, weight, vals, bias, target, prefix_weights)
    impl = _implementation(backend, config)
    k = indices.shape[1]
    if impl is None:
        sse, recon = prefix_sse_reference(indices, weight, vals, bias, target,
                                          with_reconstruction=True)
        loss = combine_prefix_sse(sse, normalized_prefix_weights(prefix_weights, k),
                                  weight.shape[1])
        return (loss, jax.lax.stop_gradient(recon)) if with_reconstruction else loss
    if prefix_weights is None:
        prefix_weights = jnp.ones((k,), jnp.float32)
        if isinstance(impl, TritonLoss):  # one coefficient for every prefix
            impl = dataclasses.replace(impl, uniform_coef=True)
    static = _Static(impl, jnp.dtype(weight.dtype), jnp.dtype(vals.dtype),
                     jnp.dtype(bias.dtype), jnp.dtype(target.dtype))
    loss, final_recon = _loss(static, indices, weight, vals, bias, target, prefix_weights)
    return (loss, jax.lax.stop_gradient(final_recon)) if with_reconstruction else loss


def topk_sae_loss(
    indices: jax.Array,  # [B, K]
    weight: jax.Array,  # [F, D]
    vals: jax.Array,  # [B, K]
    bias: jax.Array,  # [D]
    target: jax.Array,  # [B, D]
    *,
    backend: Backend = "auto",
    config: LossConfig | None = None,
) -> jax.Array:
    """Plain TopK SAE loss: mean_{b,d} of the full-K reconstruction's squared error.

    The one-hot-last case of :func:`hierarchical_sae_loss` (same kernels, same cost).
    """
    check_loss_inputs(indices, weight, vals, bias, target)
    return hierarchical_sae_loss(indices, weight, vals, bias, target,
                                 prefix_weights=topk_prefix_weights(indices.shape[1]),
                                 backend=backend, config=config)


def topk_prefix_weights(k: int) -> jax.Array:
    """[K] float32 one-hot on the last prefix: the hierarchical loss that is the TopK loss."""
    return jnp.zeros((k,), jnp.float32).at[k - 1].set(1.0)


def hierarchical_sae_prefix_sse(
    indices: jax.Array,  # [B, K]
    weight: jax.Array,  # [F, D]
    vals: jax.Array,  # [B, K]
    bias: jax.Array,  # [D]
    target: jax.Array,  # [B, D]
    *,
    backend: Backend = "auto",
    config: LossConfig | None = None,
) -> jax.Array:
    """[B, K] float32: sum over D of the squared error of every prefix reconstruction.

    Entry [b, k-1] is ||recon_k(b) - target(b)||^2: FVU at every budget k = 1..K comes
    from one call. The kernel backends never materialise [B, K, D] for the value; its
    derivatives (``jax.grad``, ``jax.jvp``, ``jax.hessian``, with respect to weight,
    vals, bias and target) come from the xla implementation on every backend.
    """
    check_loss_inputs(indices, weight, vals, bias, target)
    impl = _implementation(backend, config)
    if impl is None:
        return prefix_sse_reference(indices, weight, vals, bias, target)
    if isinstance(impl, XlaLoss):
        return impl.prefix_sse(indices, weight, vals, bias, target)
    return _prefix_sse(impl, indices, weight, vals, bias, target)
