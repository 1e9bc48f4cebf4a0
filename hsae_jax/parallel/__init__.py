"""Dictionaries beyond one device: meshes, shardings, the distributed top-k merge and the
sharded training step (the one step the trainer uses, a one-device mesh included).

See :mod:`hsae_jax.parallel.mesh` for the (data, model) layout,
:mod:`~hsae_jax.parallel.loss` / :mod:`~hsae_jax.parallel.encoder` /
:mod:`~hsae_jax.parallel.auxk` for how each piece is split, and
:mod:`~hsae_jax.parallel.plan` for the memory per device.
"""

from hsae_jax.parallel.mesh import (
    DATA,
    MODEL,
    PARAM_SPECS,
    STAT_SPECS,
    Axes,
    Layout,
    MeshShape,
    make_layout,
    make_mesh,
    tree_specs,
)
from hsae_jax.parallel.plan import PlanSettings, memory_plan, plan_report
from hsae_jax.parallel.state import abstract_state, init_state
from hsae_jax.parallel.step import make_sharded_step

__all__ = [
    "DATA",
    "MODEL",
    "PARAM_SPECS",
    "STAT_SPECS",
    "Axes",
    "Layout",
    "MeshShape",
    "PlanSettings",
    "abstract_state",
    "init_state",
    "make_layout",
    "make_mesh",
    "make_sharded_step",
    "memory_plan",
    "plan_report",
    "tree_specs",
]
