"""Steps with the update whole and in blocks of latents, for tests/test_row_blocks.py.

Run as ``python tests/row_block_runs.py MESH DTYPES CLIP BLOCKS OUT.npz`` with enough CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``): six steps from one state
(inputs of two scales so that the clip triggers in some, a NaN in the fourth so that it is
skipped), once with the whole update and once in BLOCKS blocks; saves both final states
and every step's metrics.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax.parallel import make_layout
from hsae_jax.parallel.state import init_state
from hsae_jax.train import TrainConfig
from hsae_jax.train.step import make_optimizer, make_train_step

LOW = dict(param_dtype="bfloat16", adam_dtype="bfloat16", compute_dtype="bfloat16")


def run(mesh: str, dtypes: str, clip: float, blocks: int | None):
    tc = TrainConfig.from_flat(d_model=16, n_latents=64, k=4, batch_size=32, steps=100,
                               backend="xla", mesh=mesh, update_blocks=blocks, clip_norm=clip,
                               dead_tokens=64, warmup_steps=0,
                               **(LOW if dtypes == "bfloat16" else {}))
    layout = make_layout(mesh)
    tx = make_optimizer(tc, layout)
    step = make_train_step(tc.sae, tx, layout, tc.kernels(), update=tc.row_blocks())
    sample = np.asarray(jax.random.normal(jax.random.key(0), (64, 16)))
    state = init_state(layout, tc.sae, tx, 0, sample)
    params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
    metrics = []
    for i in range(6):
        x = jax.random.normal(jax.random.key(i + 1), (32, 16)) * (4.0 if i % 2 else 1.0)
        if i == 3:
            x = x.at[0, 0].set(jnp.nan)
        params, stats, opt_state, m = step(params, stats, opt_state,
                                           layout.put_batch(np.asarray(x), 32))
        metrics.append([float(m[k]) for k in sorted(m)])
    leaves = jax.tree.leaves(jax.device_get((params, stats, opt_state)))
    return [np.asarray(leaf, np.float64) for leaf in leaves], np.asarray(metrics)


if __name__ == "__main__":
    mesh, dtypes, clip, blocks, out = sys.argv[1:]
    whole, whole_metrics = run(mesh, dtypes, float(clip), None)
    blocked, blocked_metrics = run(mesh, dtypes, float(clip), int(blocks))
    np.savez(out, whole_metrics=whole_metrics, blocked_metrics=blocked_metrics,
             **{f"whole_{i}": a for i, a in enumerate(whole)},
             **{f"blocked_{i}": a for i, a in enumerate(blocked)})
