"""The optimizer and the jit-compiled training step (on a (data, model) mesh).

Two steps compute the same update:

- :func:`make_replicated_step`: every device holds every array whole and its share of the
  batch (data parallelism); AuxK adds its gradient in place to the dead latents' rows
  (:func:`hsae_jax.model.sae_loss_and_grads`). The step measured on the H200
  (benchmarks/NOTES.md); the trainer takes it while nothing is split over ``model``.
- :func:`hsae_jax.parallel.make_sharded_step`: the dictionary split over ``model``
  (W_enc / b_enc by latents, W_dec by D), on any mesh; the trainer takes it when
  ``--mesh`` puts devices on ``model`` (or for bfloat16 storage / encoder row blocks).

:func:`make_train_step` picks one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hsae_jax.kernel_settings import DEFAULT_KERNELS, KernelSettings
from hsae_jax.model import (
    SAEConfig,
    normalize_decoder,
    project_decoder_grad,
    sae_loss_and_grads,
)
from hsae_jax.parallel import Layout, make_sharded_step
from hsae_jax.parallel import optim as sharded_optim
from hsae_jax.parallel.row_blocks import RowBlocks
from hsae_jax.parallel.step import MAX_TOKENS_SINCE_FIRED
from hsae_jax.train.config import TrainConfig

AXIS = "data"
__all__ = ["MAX_TOKENS_SINCE_FIRED", "apply_gradients", "learning_rate_schedule", "make_mesh",
           "make_optimizer", "make_replicated_step", "make_train_step", "replicate",
           "shard_batch"]


def learning_rate_schedule(tc: TrainConfig):
    """Linear warm-up to the peak rate, constant, then linear decay to 0 at the end."""
    peak = tc.peak_lr()
    warmup = max(tc.warmup_steps, 0)
    decay = int(round(tc.steps * tc.decay_fraction))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
        cool = jnp.clip((tc.steps - step) / decay, 0.0, 1.0) if decay else 1.0
        return peak * jnp.minimum(warm, cool)

    return schedule


def make_optimizer(tc: TrainConfig, layout: Layout | Mesh | None = None
                   ) -> optax.GradientTransformation:
    """clip -> Adam(schedule), skipping (and counting) any update with a non-finite gradient.

    ``layout``: the mesh the step runs on; with the dictionary split over ``model`` the
    clip takes the norm over the whole mesh (a step on such a mesh needs this). Adam's
    moments are ``tc.adam_dtype``. With ``tc.update_blocks`` the step clips
    (:mod:`hsae_jax.parallel.row_blocks`) and this has ``optax.identity`` in its place.
    """
    axes = _layout(layout).axes if layout is not None else None
    parts = []
    if tc.clip_norm > 0 and tc.update_blocks is not None:
        parts.append(optax.identity())  # the blocked update clips (same state structure)
    elif tc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(tc.clip_norm) if axes is None else
                     sharded_optim.clip_by_global_norm(tc.clip_norm, axes))
    parts.append(sharded_optim.adam(learning_rate_schedule(tc), tc.adam_dtype,
                                    tc.param_dtype))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30)


def _layout(mesh_or_layout) -> Layout:
    return mesh_or_layout if isinstance(mesh_or_layout, Layout) else Layout(mesh_or_layout)


def make_train_step(cfg: SAEConfig, tx: optax.GradientTransformation, mesh: Layout | Mesh,
                    kernels: KernelSettings = DEFAULT_KERNELS, *, replicated: bool = False,
                    update: RowBlocks | None = None):
    """``jit(shard_map(step))`` on ``mesh`` (a :class:`Layout`, a ("data", "model") mesh or
    a 1-D "data" mesh): :func:`hsae_jax.parallel.make_sharded_step`, the trainer's step on
    every mesh (on one H200 within 1% of the replicated one); ``replicated``:
    :func:`make_replicated_step`, the reference the tests compare it with (model=1 only).
    ``update``: ``TrainConfig.row_blocks()`` (the update in blocks of latents)."""
    layout = _layout(mesh)
    if replicated:
        if layout.axes.model != 1:
            raise ValueError("the replicated step needs a mesh with model=1, got "
                             f"{layout.describe()}")
        return make_replicated_step(cfg, tx, layout.mesh, kernels)
    return make_sharded_step(cfg, tx, layout, kernels, update)


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh of the first ``devices`` devices (default: all)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise ValueError(f"--devices={devices}: this process sees {len(available)} device(s)")
    return Mesh(np.asarray(available[:n]), (AXIS,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x, mesh: Mesh):
    n = mesh.devices.size
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows does not split over {n} devices")
    return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


# ------------------------------------------------- the replicated step (the reference)


def _global_norm(tree):
    return optax.tree.norm(tree) if hasattr(optax, "tree") else optax.global_norm(tree)


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads, loss):
    """The step after the gradients, every array whole: (params, opt_state, grad_norm).

    The W_dec gradient's component along each row is removed, clip + Adam run (an update
    is skipped when ``loss`` or any gradient is not finite), and W_dec rows are
    renormalised; a skipped update leaves ``params`` unchanged.
    """
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    grads["W_dec"] = project_decoder_grad(params["W_dec"], grads["W_dec"])
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params["W_dec"] = normalize_decoder(new_params["W_dec"])
    finite = opt_state.last_finite
    params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_params, params)
    return params, opt_state, _global_norm(grads)


def make_replicated_step(cfg: SAEConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         kernels: KernelSettings = DEFAULT_KERNELS):
    """The data-parallel step: params, stats and opt_state whole on every device of
    ``mesh`` (a "data" axis, and a "model" axis of size 1 if any), the batch split over
    "data", :func:`hsae_jax.model.sae_loss_and_grads` on each device's rows, gradients
    averaged, :func:`apply_gradients`, dead-latent counters advanced. A step whose loss or
    gradient is not finite changes nothing but the skip counter. Also the baseline
    ``benchmarks/shard_h200.py`` times the sharded step against."""

    def local_step(params, stats, opt_state, x):
        (loss, aux), grads = sae_loss_and_grads(cfg, params, stats, x, kernels)
        grads = jax.lax.pmean(grads, AXIS)
        loss = jax.lax.pmean(loss, AXIS)
        params, opt_state, grad_norm = apply_gradients(tx, params, opt_state, grads, loss)
        finite = opt_state.last_finite

        tokens = x.shape[0] * jax.lax.psum(1, AXIS)
        fired = jax.lax.psum(aux["fired"].astype(jnp.int32), AXIS) > 0
        since = jnp.where(fired, 0, jnp.minimum(stats["tokens_since_fired"] + tokens,
                                                 MAX_TOKENS_SINCE_FIRED))
        stats = {**stats, "tokens_since_fired": jnp.where(finite, since,
                                                          stats["tokens_since_fired"])}
        metrics = {
            "loss": loss,
            "recon_loss": jax.lax.pmean(aux["recon_loss"], AXIS),
            "auxk_loss": jax.lax.pmean(aux["auxk_loss"], AXIS),
            "l0": jax.lax.pmean(aux["l0"], AXIS),
            "dead_fraction": jnp.mean(stats["tokens_since_fired"] >= cfg.dead_tokens),
            "grad_norm": grad_norm,
            "skipped_steps": opt_state.total_notfinite,
        }
        return params, stats, opt_state, metrics

    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)),
                            out_specs=(P(), P(), P(), P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0, 1, 2))
