"""The jit-compiled training step on a (data, model) mesh: ``jit(shard_map(local_step))``.

The state (params, stats, optimizer state) is sharded as :mod:`hsae_jax.parallel.mesh`
says and donated; the batch is split over ``data``. One step on each device: the loss
and gradients of its rows on its blocks (:func:`sharded_sae_loss_and_grads`: AuxK's
gradient added in place to the dead latents' rows), gradients averaged
over ``data``, :func:`~hsae_jax.parallel.optim.apply_gradients`, and its latents'
dead-latent counters advanced. No device ever holds a whole [F, D] matrix, and on a
one-device mesh the program holds no collective (every one is left out on an axis of
size 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from hsae_jax.kernel_settings import DEFAULT_KERNELS, KernelSettings
from hsae_jax.model import MAX_DEAD_TOKENS, SAEConfig
from hsae_jax.parallel.auxk import BOUND_LAG_STEPS, dead_bound, fits_bucket
from hsae_jax.parallel.loss import sharded_sae_loss_and_grads
from hsae_jax.parallel.mesh import DATA, Layout, tree_specs
from hsae_jax.parallel.optim import apply_gradients
from hsae_jax.parallel.row_blocks import RowBlocks, apply_gradients_in_row_blocks, check_blocks

MAX_TOKENS_SINCE_FIRED = MAX_DEAD_TOKENS  # the counters saturate (no int32 overflow) there


def make_sharded_step(cfg: SAEConfig, tx: optax.GradientTransformation, layout: Layout,
                      kernels: KernelSettings = DEFAULT_KERNELS, update: RowBlocks | None = None):
    """``step(params, stats, opt_state, x, auxk_bucket=None) -> (params, stats, opt_state,
    metrics)``.

    ``tx`` clips with the norm over the mesh (``make_optimizer(tc, layout)``). A step whose
    loss or gradient is not finite changes nothing but the skip counter. metrics: loss,
    recon_loss, auxk_loss, l0 (means over the global batch), dead_fraction, grad_norm,
    skipped_steps, and for the host's choice of AuxK's bucket: auxk_bound (int32: the
    most latents a device can have dead ``BOUND_LAG_STEPS`` steps after this one,
    :func:`~hsae_jax.parallel.auxk.dead_bound`) and auxk_fits (bool: ``auxk_bucket`` held
    this step's dead latents). ``update``: the update in blocks of latents
    (:mod:`hsae_jax.parallel.row_blocks`; ``tx`` then without its clip).

    ``auxk_bucket`` (static; one compiled step each): AuxK's column bucket chosen on the
    host (:class:`hsae_jax.train.auxk_buckets.AuxKBuckets`), no conditional in the step;
    None: the device finds it (seven ``lax.cond``s, each a round trip to the host).
    """
    layout.check(cfg)
    axes = layout.axes
    if update is not None:
        check_blocks(update.blocks, cfg.n_latents // axes.model, cfg.n_latents)

    def local_step(params, stats, opt_state, x, auxk_bucket):
        (loss, aux), grads = sharded_sae_loss_and_grads(cfg, axes, params, stats, x, kernels,
                                                        auxk_bucket)
        if cfg.auxk_coef > 0:  # the most dead latents a device has now, in the bucket?
            most = dead_bound(cfg, axes, stats["tokens_since_fired"], tokens_per_step=0,
                              steps_ahead=0)
            fits = fits_bucket(cfg, axes, most, auxk_bucket)
        else:
            fits = jnp.bool_(True)
        with jax.named_scope("data_mean"):  # the gradient all-reduce over data
            grads = axes.pmean_data(grads)
            loss = axes.pmean_data(loss)
        with jax.named_scope("optimizer"):  # the scopes name the step's pieces in profiles
            if update is None:
                params, opt_state, grad_norm = apply_gradients(tx, axes, params, opt_state,
                                                               grads, loss)
            else:
                params, opt_state, grad_norm = apply_gradients_in_row_blocks(
                    tx, update, axes, params, opt_state, grads, loss)
        finite = opt_state.last_finite

        with jax.named_scope("counters"):
            tokens = x.shape[0] * axes.data
            fired = axes.psum_data(aux["fired"].astype(jnp.int32)) > 0
            since = jnp.where(fired, 0, jnp.minimum(stats["tokens_since_fired"] + tokens,
                                                     MAX_TOKENS_SINCE_FIRED))
            stats = {**stats, "tokens_since_fired": jnp.where(finite, since,
                                                              stats["tokens_since_fired"])}
            dead = axes.psum_model(jnp.sum(stats["tokens_since_fired"] >= cfg.dead_tokens))
            bound = (dead_bound(cfg, axes, stats["tokens_since_fired"], tokens,
                                BOUND_LAG_STEPS - 1) if cfg.auxk_coef > 0 else jnp.int32(0))
        metrics = {
            "loss": loss,
            "recon_loss": axes.pmean_data(aux["recon_loss"]),
            "auxk_loss": axes.pmean_data(aux["auxk_loss"]),
            "l0": axes.pmean_data(aux["l0"]),
            "dead_fraction": dead.astype(jnp.float32) / cfg.n_latents,
            "grad_norm": grad_norm,
            "skipped_steps": opt_state.total_notfinite,
            "auxk_bound": bound,
            "auxk_fits": fits,
        }
        return params, stats, opt_state, metrics

    def step(params, stats, opt_state, x, auxk_bucket=None):
        specs = tree_specs((params, stats, opt_state))
        sharded = jax.shard_map(functools.partial(local_step, auxk_bucket=auxk_bucket),
                                mesh=layout.mesh, in_specs=(*specs, P(DATA)),
                                out_specs=(*specs, P()), check_vma=False)
        return sharded(params, stats, opt_state, x)

    return jax.jit(step, donate_argnums=(0, 1, 2), static_argnames=("auxk_bucket",))
