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
    is the step's peak)."""
    from hsae_jax.parallel.plan import LOW_MEMORY, compiled_memory
    from hsae_jax.train import TrainConfig

    temps = {}
    for blocks in (None, 16):
        tc = TrainConfig.from_flat(d_model=512, n_latents=2**15, k=64, batch_size=1024,
                                   backend="xla", **{**LOW_MEMORY, "encoder_rows": 256,
                                                     "update_blocks": blocks})
        temps[blocks] = compiled_memory(tc, 1)["temp"]
    matrix = 2**15 * 512 * 4
    assert temps[16] <= temps[None] - matrix, {k: v / matrix for k, v in temps.items()}


def test_a_run_in_blocks_trains_and_resumes_with_the_whole_update(tmp_path):
    from hsae_jax.train import TrainConfig, resume, train

    tc = TrainConfig.from_flat(d_model=16, n_latents=64, k=4, batch_size=32, steps=4,
                               save_every=2, eval_batches=1, backend="xla", update_blocks=4)
    first = train(tc, str(tmp_path / "run"), progress=False, log=lambda *_: None)
    assert first["skipped_steps"] == 0 and np.isfinite(first["fvu"])
    more = resume(str(tmp_path / "run"), steps=6, update_blocks=None, progress=False,
                  log=lambda *_: None)
    assert more["steps"] == 6 and np.isfinite(more["fvu"])
