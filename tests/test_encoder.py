"""topk_encode: the sparse backward equals plain autodiff through the dense matmul."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_gpu, requires_interpreter

from hsae_jax.encoder import SparseEncoderConfig, topk_encode
from hsae_jax.segments import SegmentSumConfig

BACKENDS = [
    pytest.param("xla", None, id="xla"),
    pytest.param("xla", SparseEncoderConfig(xla_chunk=3), id="xla-chunk3"),
    # the forward in blocks of 5 rows (the last one padded)
    pytest.param("xla", SparseEncoderConfig(forward_rows=5), id="xla-rows5"),
    pytest.param("interpret", None, marks=requires_interpreter, id="interpret"),
    # several D tiles and several pair steps per latent
    pytest.param("interpret", SparseEncoderConfig(SegmentSumConfig(block_pairs=2, block_d=8)),
                 marks=requires_interpreter, id="interpret-small-blocks"),
    pytest.param("triton", None, marks=requires_gpu, id="triton"),
    pytest.param("triton", SparseEncoderConfig(SegmentSumConfig(block_pairs=2, block_d=8)),
                 marks=requires_gpu, id="triton-small-blocks"),
]


def encoder_inputs(seed, b, d, f):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(f, d)) / np.sqrt(d), jnp.float32),
            jnp.asarray(rng.normal(size=f) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32))


def value_and_grads(backend, config, inputs, k, cotangent):
    def f(*args):
        vals, indices = topk_encode(*args, k, backend=backend, config=config)
        return jnp.sum(vals * cotangent), (vals, indices)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(*inputs)


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("b, d, f, k", [(6, 20, 50, 5), (9, 33, 130, 16), (3, 7, 8, 8)])
def test_sparse_backward_equals_dense_autodiff(backend, config, b, d, f, k, rng_seed):
    inputs = encoder_inputs(rng_seed, b, d, f)
    cotangent = jnp.asarray(np.random.default_rng(rng_seed + 1).normal(size=(b, k)), jnp.float32)
    # full float32 matmuls on both sides (on a GPU the default is TF32, which would make
    # the dense reference the less exact of the two)
    with jax.default_matmul_precision("highest"):
        (_, (vals, idx)), grads = value_and_grads(backend, config, inputs, k, cotangent)
        (_, (ref_vals, ref_idx)), ref_grads = value_and_grads("reference", None, inputs, k,
                                                              cotangent)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    chex.assert_trees_all_close(vals, ref_vals, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(vals) >= 0)
    assert np.all(np.diff(np.asarray(vals), axis=1) <= 0)  # sorted descending


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_hot_latents_chosen_by_every_token(backend, config, rng_seed):
    """A few latents in every token's top-k: long runs for one latent, empty runs elsewhere."""
    x, w_enc, b_enc, b_dec = encoder_inputs(rng_seed, 40, 12, 64)
    b_enc = b_enc.at[jnp.array([3, 17, 60])].add(50.0)
    inputs, k = (x, w_enc, b_enc, b_dec), 4
    cotangent = jnp.asarray(np.random.default_rng(rng_seed).normal(size=(40, k)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        (_, (_, idx)), grads = value_and_grads(backend, config, inputs, k, cotangent)
        _, ref_grads = value_and_grads("reference", None, inputs, k, cotangent)
    assert set(np.asarray(idx)[:, :3].ravel()) == {3, 17, 60}
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
    again = value_and_grads(backend, config, inputs, k, cotangent)[1]
    chex.assert_trees_all_equal(grads[1], again[1])  # dW_enc: no atomics, same order


@pytest.mark.parametrize("make, message", [
    (lambda: SparseEncoderConfig(segment_sum=SegmentSumConfig(block_d=48)),
     "SegmentSumConfig.block_d=48 must be a power of two"),
    (lambda: SparseEncoderConfig(segment_sum=SegmentSumConfig(num_warps=0)),
     "SegmentSumConfig.num_warps=0 must be an int >= 1"),
    (lambda: SparseEncoderConfig(xla_chunk=0), "SparseEncoderConfig.xla_chunk=0"),
    (lambda: SparseEncoderConfig(forward_rows=0), "SparseEncoderConfig.forward_rows=0"),
])
def test_bad_config_is_rejected_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", ["x", "w_enc", "b_enc", "b_dec"])
def test_integer_inputs_are_rejected_by_name(name):
    inputs = dict(zip(("x", "w_enc", "b_enc", "b_dec"), encoder_inputs(0, 4, 6, 10),
                      strict=True))
    inputs[name] = inputs[name].astype(jnp.int32)
    with pytest.raises(TypeError, match=f"{name} has dtype int32"):
        topk_encode(**inputs, k=3, backend="xla")


@pytest.mark.parametrize("k", [0, -1, 11, 2.0])
def test_k_outside_one_to_f_is_rejected(k):
    with pytest.raises(ValueError, match=f"k={k!r} must be an int in \\[1, F=10\\]"):
        topk_encode(*encoder_inputs(0, 4, 6, 10), k, backend="reference")


def test_relu_blocks_the_gradient_of_negative_selections():
    x, w_enc, b_enc, b_dec = encoder_inputs(0, 4, 6, 10)
    b_enc = b_enc - 100.0  # every pre-activation negative: every selected value ReLU'd to 0
    grads = jax.grad(lambda w: jnp.sum(topk_encode(x, w, b_enc, b_dec, 3, backend="xla")[0]))(
        w_enc)
    assert np.all(np.asarray(grads) == 0)


def test_mismatched_shapes_are_rejected():
    x, w_enc, b_enc, b_dec = encoder_inputs(0, 4, 6, 10)
    with pytest.raises(ValueError, match=r"x \(4, 5\) must be \[B, D=6\]"):
        topk_encode(x[:, :5], w_enc, b_enc, b_dec, 3)


@pytest.mark.parametrize("wrt_x", [False, True])
def test_the_dx_gather_runs_only_when_x_is_differentiated(wrt_x):
    """Training differentiates the parameters only; the [B, K, D] gather for dx is dropped."""
    inputs = encoder_inputs(0, 16, 8, 64)
    argnums = (0, 1, 2, 3) if wrt_x else (1, 2, 3)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(topk_encode(*a, 4, backend="xla")[0]),
                            argnums=argnums))
    hlo = grad.lower(*inputs).compile().as_text()
    assert (" gather(" in hlo) == wrt_x


def test_the_reference_backends_sparse_encoder_takes_its_config():
    """What the trainer runs on backend="reference": the xla encoder, configured (scoring
    rows a few at a time gives the same selection); topk_encode's dense reference path
    takes no config."""
    from hsae_jax.encoder.api import make_encoder

    rng = np.random.default_rng(5)
    x, w, b_enc, b_dec = (jnp.asarray(rng.normal(size=s), jnp.float32)
                          for s in ((20, 8), (32, 8), (32,), (8,)))
    enc = make_encoder(4, backend="reference", config=SparseEncoderConfig(forward_rows=6))
    assert enc.backend == "xla" and enc.config.forward_rows == 6
    vals, indices, _, _ = enc.forward(x, w, b_enc, b_dec)
    want_vals, want_indices = topk_encode(x, w, b_enc, b_dec, 4, backend="reference")
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(vals, want_vals, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="does not configure backend='reference'"):
        topk_encode(x, w, b_enc, b_dec, 4, backend="reference",
                    config=SparseEncoderConfig(forward_rows=6))
