"""The update a block of latents at a time (``--update-blocks``) is the whole update."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

RUNS = pathlib.Path(__file__).with_name("row_block_runs.py")


@pytest.mark.parametrize("mesh, dtypes, clip, blocks", [
    ("data=1,model=1", "float32", 0.0, 8),
    ("data=1,model=1", "float32", 0.05, 4),  # the clip scales every step
    ("data=2,model=2", "float32", 1.0, 4),
    ("data=1,model=2", "bfloat16", 0.05, 4),
])
def test_the_update_in_blocks_is_the_whole_update(tmp_path, mesh, dtypes, clip, blocks):
    """Six steps (one skipped for a NaN) in blocks of latents end where the whole update
    does: float32 within a few float32 roundings (XLA may fuse the arithmetic otherwise),
    bfloat16 within one bfloat16 step (stochastic rounding keyed on the update's bits); the
    metrics of every step (loss, grad norm, skipped steps, ...) too."""
    out = tmp_path / "runs.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(RUNS), mesh, dtypes, str(clip), str(blocks),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = np.load(out)
    n = len([k for k in runs.files if k.startswith("whole_") and k[6:].isdigit()])
    step = 2.0 ** -7 if dtypes == "bfloat16" else 2.0 ** -22
    for i in range(n):
        whole, blocked = runs[f"whole_{i}"], runs[f"blocked_{i}"]
        assert whole.shape == blocked.shape
        np.testing.assert_allclose(blocked, whole, rtol=step, atol=step * 0.05, err_msg=str(i))
    np.testing.assert_allclose(runs["blocked_metrics"], runs["whole_metrics"],
                               rtol=1e-3 if dtypes == "bfloat16" else 1e-6, atol=1e-7)
    skipped = runs["whole_metrics"][:, -1]  # "skipped_steps" sorts last
    assert skipped[-1] == 1 and np.array_equal(runs["blocked_metrics"][:, -1], skipped)


@pytest.mark.parametrize("bad, row, clip", [(np.nan, 0, 0.0), (np.nan, 63, 0.0),
                                            (np.inf, 5, 1.0)])
def test_a_non_finite_gradient_with_a_finite_loss_skips_the_whole_step(bad, row, clip):
    """One NaN / inf gradient entry (the loss finite): like the whole update, nothing moves
    in any block and the step counts as skipped (the per-block optimizer sees one block:
    the check is over every gradient first)."""
    import jax
    import jax.numpy as jnp

    from hsae_jax.model import normalize_decoder
    from hsae_jax.parallel.mesh import Axes
    from hsae_jax.parallel.optim import apply_gradients
    from hsae_jax.parallel.row_blocks import RowBlocks, apply_gradients_in_row_blocks
    from hsae_jax.train import TrainConfig
    from hsae_jax.train.step import make_optimizer

    f, d = 64, 16
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"W_enc": jax.random.normal(keys[0], (f, d)),
              "b_enc": jax.random.normal(keys[1], (f,)),
              "W_dec": normalize_decoder(jax.random.normal(keys[2], (f, d))),
              "b_dec": jnp.zeros(d)}
    grads = {n: 0.1 * jax.random.normal(keys[3], v.shape) for n, v in params.items()}
    grads["W_enc"] = grads["W_enc"].at[row, 0].set(bad)
    for blocks in (None, 4):
        tc = TrainConfig.from_flat(d_model=d, n_latents=f, k=4, batch_size=32, backend="xla",
                                   clip_norm=clip, warmup_steps=0, update_blocks=blocks)
        tx = make_optimizer(tc)
        if blocks is None:
            fn = lambda p, s, g, tx=tx: apply_gradients(tx, Axes(1, 1), p, s, g, 1.0)  # noqa: E731
        else:
            fn = lambda p, s, g, tx=tx: apply_gradients_in_row_blocks(  # noqa: E731
                tx, RowBlocks(4, clip), Axes(1, 1), p, s, g, 1.0)
        new, state, _ = jax.jit(fn)(dict(params), tx.init(params), dict(grads))
        assert not bool(state.last_finite) and int(state.total_notfinite) == 1, blocks
        for name in params:
            np.testing.assert_array_equal(new[name], params[name], err_msg=f"{name} {blocks}")


def test_blocks_must_divide_the_latents_of_each_device():
    from hsae_jax.parallel import make_layout
    from hsae_jax.train import TrainConfig
    from hsae_jax.train.step import make_optimizer, make_train_step

    tc = TrainConfig.from_flat(d_model=16, n_latents=64, k=4, batch_size=32, backend="xla",
                               update_blocks=3)
    layout = make_layout("data=1,model=1", 1)
    with pytest.raises(ValueError, match="--update-blocks=3 must divide"):
        make_train_step(tc.sae, make_optimizer(tc, layout), layout, tc.kernels(),
                        update=tc.row_blocks())


def test_the_update_in_blocks_holds_less_memory():
    """XLA's compiled step (CPU, shapes only) with the low-memory options: the update in 16
    blocks needs at least one float32 [F, D] matrix less of temporaries (there the update
    is the step's peak), and 64 blocks no more than 16 (nothing holds a whole matrix)."""
    from hsae_jax.parallel.plan import LOW_MEMORY, compiled_memory
    from hsae_jax.train import TrainConfig

    temps = {}
    for blocks in (None, 16, 64):
        tc = TrainConfig.from_flat(d_model=512, n_latents=2**15, k=64, batch_size=1024,
                                   backend="xla", **{**LOW_MEMORY, "encoder_rows": 256,
                                                     "update_blocks": blocks})
        temps[blocks] = compiled_memory(tc, 1)["temp"]
    matrix = 2**15 * 512 * 4
    assert temps[16] <= temps[None] - matrix, {k: v / matrix for k, v in temps.items()}
    assert temps[64] <= temps[16], {k: v / matrix for k, v in temps.items()}  # no whole copy


def test_a_run_in_blocks_trains_and_resumes_with_the_whole_update(tmp_path):
    from hsae_jax.train import TrainConfig, resume, train

    tc = TrainConfig.from_flat(d_model=16, n_latents=64, k=4, batch_size=32, steps=4,
                               save_every=2, eval_batches=1, backend="xla", update_blocks=4)
    first = train(tc, str(tmp_path / "run"), progress=False, log=lambda *_: None)
    assert first["skipped_steps"] == 0 and np.isfinite(first["fvu"])
    more = resume(str(tmp_path / "run"), steps=6, update_blocks=None, progress=False,
                  log=lambda *_: None)
    assert more["steps"] == 6 and np.isfinite(more["fvu"])
