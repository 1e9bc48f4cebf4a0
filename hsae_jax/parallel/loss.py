"""The training objective on one device's blocks: :func:`hsae_jax.model.sae_loss`, sharded.

Inside ``shard_map`` each device holds its rows of the batch (split over ``data``) and
its blocks of the parameters (:mod:`hsae_jax.parallel.mesh`). The encoder merges the
global top K (:mod:`hsae_jax.parallel.encoder`). The decoder loss is a sum over D of
squared errors, so the fused loss kernel runs unchanged on each device's D slice
(``W_dec[:, D/m]``, ``b_dec`` and the inputs' same columns): its loss is the slice's
share, and the per-prefix sums add up over ``model`` (:func:`sum_over`). The selected
values feed every slice, so their gradient is summed (:func:`grad_psum`) before the
encoder's backward; ``dW_dec`` stays local. ``b_dec`` is used whole by the encoder and by
slices in the decoder, so its gradient is the sum of the devices' shares. AuxK is
:mod:`hsae_jax.parallel.auxk`. With a mesh of one device every collective drops out and
the computation is ``sae_loss``'s.

The step differentiates everything but AuxK and adds AuxK's gradient in place
(:func:`sharded_sae_loss_and_grads`), as the one-device trainer does
(:func:`hsae_jax.model.sae_loss_and_grads`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.encoder.api import make_encoder
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.loss.api import hierarchical_sae_loss_and_reconstruction, topk_prefix_weights
from hsae_jax.model import SAEConfig, fired_latents, scale_inputs
from hsae_jax.parallel.auxk import sharded_auxk_loss, sharded_auxk_loss_and_add_grads
from hsae_jax.parallel.collectives import grad_psum, sum_over
from hsae_jax.parallel.encoder import sharded_topk_encode
from hsae_jax.parallel.mesh import Axes
from hsae_jax.sparse_rows import safe_indices


def _cast(cfg: SAEConfig, x):
    return x.astype(jnp.bfloat16) if cfg.compute_dtype == "bfloat16" else x


def encode_local(cfg: SAEConfig, axes: Axes, params, stats, x, kernels: KernelSettings,
                 k: int | None = None, b_dec=None, with_scores: bool = False):
    """(vals, indices) [B, k] of raw activations x [B, D]: the global top k, merged over
    ``model`` (``b_dec``: the one to differentiate, default ``params["b_dec"]``);
    ``with_scores``: and this device's pre-activations [B, F/m] float32, constant."""
    xs = scale_inputs(stats, x)
    enc = make_encoder(cfg.k if k is None else k, backend=kernels.backend,
                       topk_config=kernels.topk, config=kernels.encoder)
    return sharded_topk_encode(enc, axes, _cast(cfg, xs), _cast(cfg, params["W_enc"]),
                               params["b_enc"], params["b_dec"] if b_dec is None else b_dec,
                               with_scores=with_scores)


def keeps_scores(cfg: SAEConfig, kernels: KernelSettings) -> bool:
    """Whether the step keeps the encoder's pre-activations for AuxK to read its dead
    columns from: with AuxK on and its largest bucket every column (its [B, F/m] buffers
    then exist anyway), unless ``--encoder-rows`` scores the batch a block of rows at a
    time. Kept, the [B, F/m] float32 scores live through the backward pass; with
    ``--auxk-max-fraction`` below 1 (chosen to save memory) AuxK computes its columns."""
    return cfg.auxk_coef > 0 and cfg.auxk_max_fraction >= 1 and (
        kernels.encoder is None or kernels.encoder.forward_rows is None)


def d_slice(axes: Axes, x, axis: int = -1):
    """This device's block of ``x`` along D (all of it with model = 1)."""
    if axes.model == 1:
        return x
    size = x.shape[axis] // axes.model
    return jax.lax.dynamic_slice_in_dim(x, axes.model_index() * size, size, axis=axis)


def local_fired(axes: Axes, indices, vals, f_local: int) -> jax.Array:
    """[F/m] bool: which of this device's latents have a positive value for some token."""
    if axes.model == 1:
        return fired_latents(indices, vals, f_local)
    local = safe_indices(indices - axes.model_index() * f_local, f_local)
    return jnp.zeros((f_local,), jnp.bool_).at[local.reshape(-1)].max(
        vals.reshape(-1) > 0, mode="drop")


def sharded_sae_loss(cfg: SAEConfig, axes: Axes, params, stats, x,
                     kernels: KernelSettings, *, with_auxk: bool = True):
    """(loss, aux) of this device's rows x [B/d, D], like :func:`hsae_jax.model.sae_loss`.

    The loss is the same on every device of ``model`` and its mean over ``data`` is the
    global batch's; so is the mean of every gradient over ``data`` (``b_dec``'s included:
    its per-device shares are summed over ``model`` here). aux: recon_loss, auxk_loss, l0,
    fired [F/m] (this device's latents), num_dead (global), vals and indices [B/d, K] (the
    merged selection). ``with_auxk=False`` leaves AuxK out (:func:`sharded_sae_loss_and_grads`
    adds it separately).
    """
    b_dec = grad_psum(params["b_dec"], axes.model)
    xs = scale_inputs(stats, x)
    with_scores = not with_auxk and keeps_scores(cfg, kernels)
    with jax.named_scope("encoder"):  # the scopes name the step's pieces in profiles
        vals, indices, *scores = encode_local(cfg, axes, params, stats, x, kernels,
                                              b_dec=b_dec, with_scores=with_scores)
    loss_kw = dict(backend=kernels.backend, config=kernels.loss)
    w_dec = _cast(cfg, params["W_dec"])  # [F, D/m]
    slice_args = (indices, w_dec, grad_psum(vals, axes.model), d_slice(axes, b_dec),
                  d_slice(axes, xs))
    with jax.named_scope("decoder_loss"):
        prefix_weights = (topk_prefix_weights(cfg.k) if cfg.objective == "topk"
                          else cfg.prefix_weights())
        recon_loss, reconstruction = hierarchical_sae_loss_and_reconstruction(
            *slice_args, prefix_weights=prefix_weights, **loss_kw)
    if axes.model > 1:  # each slice's loss is its mean over B x D/m
        recon_loss = sum_over(recon_loss, axes.model) / axes.model
    dead = stats["tokens_since_fired"] >= cfg.dead_tokens
    auxk = jnp.float32(0.0)
    if cfg.auxk_coef > 0 and with_auxk:
        auxk = sharded_auxk_loss(cfg, axes, params, b_dec, xs, vals, indices, dead, kernels)
    aux = {
        "recon_loss": recon_loss,
        "auxk_loss": auxk,
        "l0": jnp.mean(jnp.sum(vals > 0, axis=1).astype(jnp.float32)),
        "fired": local_fired(axes, indices, vals, dead.shape[0]),
        "num_dead": axes.psum_model(jnp.sum(dead)),
        "vals": vals,
        "indices": indices,
        # recon_K of this device's D slice, constant; None when the loss saw other decoder
        # rows than AuxK's residual uses (W_dec cast to the compute dtype)
        "reconstruction": reconstruction if w_dec.dtype == params["W_dec"].dtype else None,
        # this device's pre-activations [B/d, F/m] for AuxK's dead columns, or None
        "scores": scores[0] if scores else None,
    }
    return recon_loss + cfg.auxk_coef * auxk, aux


def sharded_sae_loss_and_grads(cfg: SAEConfig, axes: Axes, params, stats, x,
                               kernels: KernelSettings, auxk_bucket: int | None = None):
    """((loss, aux), grads) of this device's rows and blocks: ``jax.value_and_grad`` of
    :func:`sharded_sae_loss`, the way the step computes it: autodiff of everything but
    AuxK, then AuxK's value and gradient added in place to the dead latents' rows only
    (:func:`~hsae_jax.parallel.auxk.sharded_auxk_loss_and_add_grads`), so a step without
    dead latents does no AuxK work (the backward of a switch would write zero gradients
    and every bucket's saved residuals). ``auxk_bucket``: AuxK's static bucket
    (:func:`~hsae_jax.parallel.auxk.sharded_auxk_loss_and_add_grads`)."""
    grad_fn = jax.value_and_grad(functools.partial(sharded_sae_loss, cfg, axes,
                                                   kernels=kernels, with_auxk=False),
                                 has_aux=True)
    (loss, aux), grads = grad_fn(params, stats, x)
    scores = aux.pop("scores")
    if cfg.auxk_coef > 0:
        dead = stats["tokens_since_fired"] >= cfg.dead_tokens
        with jax.named_scope("auxk"):
            auxk, grads = sharded_auxk_loss_and_add_grads(
                cfg, axes, params, scale_inputs(stats, x), aux["vals"], aux["indices"], dead,
                grads, kernels, reconstruction=aux["reconstruction"], scores=scores,
                bucket=auxk_bucket)
        loss = loss + cfg.auxk_coef * auxk
        aux = {**aux, "auxk_loss": auxk}
    return (loss, aux), grads
