"""Checkpoints are written in the background: a save returns once the state is off the
device, and a write that fails is raised by the next wait, save or close."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsae_jax.train.checkpoint import Checkpointer


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_a_save_copies_the_state_off_the_device_before_it_returns(tmp_path, rng_seed):
    """The training step donates its buffers right after a save: the checkpoint must hold
    the values saved, not what the buffers hold later."""
    values = np.random.default_rng(rng_seed).standard_normal((512, 64)).astype(np.float32)
    state = {"params": {"W": jnp.asarray(values)}, "step_count": jnp.int32(7)}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, state, {"step": 3})
    abstract = _abstract(state)
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what donation does to the buffers
    ckpt.close()
    restored, meta = Checkpointer(str(tmp_path)).restore(abstract, 3)
    np.testing.assert_array_equal(restored["params"]["W"], values)
    assert int(restored["step_count"]) == 7 and meta == {"step": 3}


def test_a_failed_background_write_is_raised_and_the_previous_checkpoint_stays(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, {"w": jnp.arange(8.0)}, {"step": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.save(2, {"w": jnp.ones(8)}, {"step": 2, "unwritable": object()})
        ckpt.wait()
    ckpt.close()
    again = Checkpointer(str(tmp_path))
    assert again.steps() == [1]
    restored, meta = again.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))
    assert meta == {"step": 1}
