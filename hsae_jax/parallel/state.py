"""The training state made, restored and read back in its sharded layout.

A new state is made by one jitted function whose outputs carry the layout's shardings,
so each device computes only its own blocks (random draws are partitionable: the values
equal those of the one-device initialisation). Checkpoints are restored into
:func:`abstract_state` (orbax reads each device's block), whatever mesh they were saved
from.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from hsae_jax.model import SAEConfig, init_arrays
from hsae_jax.parallel.mesh import Layout

PARAM_DTYPES = ("float32", "bfloat16")
STORED_LOW = ("W_enc", "W_dec")  # the matrices param_dtype applies to; biases stay float32


def cast_params(params: dict, param_dtype: str = "float32") -> dict:
    """W_enc and W_dec in ``param_dtype`` (biases stay float32)."""
    if param_dtype == "float32":
        return params
    return {n: p.astype(param_dtype) if n in STORED_LOW else p for n, p in params.items()}


def _state_fn(cfg: SAEConfig, tx: optax.GradientTransformation, seed: int, param_dtype: str):
    def make(sample):
        params, stats = init_arrays(cfg, jax.random.key(seed), sample)
        params = cast_params(params, param_dtype)
        return {"params": params, "stats": stats, "opt_state": tx.init(params)}

    return make


def abstract_state(layout: Layout, cfg: SAEConfig, tx: optax.GradientTransformation,
                   param_dtype: str = "float32") -> dict:
    """Shapes, dtypes and shardings of the state {"params", "stats", "opt_state"}."""
    shapes = jax.eval_shape(_state_fn(cfg, tx, 0, param_dtype), None)
    return layout.abstract(shapes)


def init_state(layout: Layout, cfg: SAEConfig, tx: optax.GradientTransformation, seed: int,
               sample=None, param_dtype: str = "float32") -> dict:
    """A new state, made in place on the mesh. ``sample`` [N, D] (the same on every
    process) sets the input scale and b_dec."""
    make = _state_fn(cfg, tx, seed, param_dtype)
    shardings = layout.shardings(jax.eval_shape(make, None))
    if sample is None:
        return jax.jit(lambda: make(None), out_shardings=shardings)()
    sample = np.asarray(sample)  # replicated input, valid with several processes
    return jax.jit(make, out_shardings=shardings)(sample)


def host_arrays(tree):
    """``tree`` readable on this host (``np.asarray``) with one process or several: arrays
    split across processes are gathered first (every process must call this)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: x if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated
        else multihost_utils.process_allgather(x, tiled=True), tree)
