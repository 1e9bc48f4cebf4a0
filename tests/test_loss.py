"""hierarchical_sae_loss: value and every gradient equal the float64 oracle, on every backend.

One test body per property, parameterised by backend: reference, xla (two chunkings),
and the Triton kernels (fused, two-pass, and the fused kernel's deterministic mode)
compiled on a GPU or interpreted on the CPU.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_close_to_oracle,
    enable_x64,
    make_inputs,
    requires_gpu,
    requires_interpreter,
)
from loss_checks import (
    DETERMINISTIC,
    FUSED,
    GRAD_NAMES,
    TWO_PASS,
    check_against_oracle,
    loss_and_grads,
)
from oracle import decoder_loss_oracle

import hsae_jax
from hsae_jax import TritonLossConfig, XlaLossConfig

BACKENDS = [
    pytest.param("reference", None, id="reference"),
    pytest.param("xla", None, id="xla"),
    pytest.param("xla", XlaLossConfig(chunk=3), id="xla-chunk3"),
    pytest.param("interpret", FUSED, marks=requires_interpreter, id="interpret-fused"),
    pytest.param("interpret", TWO_PASS, marks=requires_interpreter, id="interpret-two_pass"),
    pytest.param("interpret", DETERMINISTIC, marks=requires_interpreter,
                 id="interpret-deterministic"),
    pytest.param("triton", FUSED, marks=requires_gpu, id="triton-fused"),
    pytest.param("triton", TWO_PASS, marks=requires_gpu, id="triton-two_pass"),
    pytest.param("triton", DETERMINISTIC, marks=requires_gpu, id="triton-deterministic"),
]

SHAPES = [  # (B, K, F, D)
    pytest.param((16, 8, 64, 64), id="seedlike-B16-K8-D64"),
    pytest.param((7, 50, 13, 33), id="odd-B7-K50-D33"),
    pytest.param((1, 1, 1, 1), id="B1-K1-F1-D1"),
    pytest.param((5, 1, 9, 7), id="K1"),
    pytest.param((3, 17, 40, 130), id="K17-D130"),
]

DTYPE_CASES = {
    "float32": ("float32",) * 4,
    "bfloat16": ("bfloat16",) * 4,
    "float16": ("float16",) * 4,
    "mixed": ("bfloat16", "float32", "float16", "bfloat16"),
}

KERNELS = ("interpret", "triton")


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", DTYPE_CASES.keys())
def test_value_and_gradients_match_float64_oracle(backend, config, shape, dtypes, rng_seed):
    inputs = make_inputs(rng_seed, *shape, dtypes=DTYPE_CASES[dtypes])
    value, grads = loss_and_grads(backend, config, inputs)
    check_against_oracle(value, grads, inputs)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_non_unit_cotangent_scales_every_gradient(backend, config, rng_seed):
    inputs = make_inputs(rng_seed, 6, 12, 20, 40)
    pw = jnp.asarray(np.random.default_rng(rng_seed).uniform(0.1, 1.0, 12), jnp.float32)
    value, grads = loss_and_grads(backend, config, inputs, pw, cotangent=-3.25)
    check_against_oracle(value, grads, inputs, pw, cotangent=-3.25)


PREFIX_WEIGHT_CASES = {
    "ones": lambda k: np.ones(k),
    "one_hot_last": lambda k: np.eye(k)[k - 1],
    "few_budgets": lambda k: np.isin(np.arange(k), [0, k // 2, k - 1]).astype(float) * [2.0],
    "random": lambda k: np.random.default_rng(k).uniform(0.0, 3.0, k),
}


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("case", PREFIX_WEIGHT_CASES.keys())
def test_prefix_weights_select_the_objective(backend, config, case, rng_seed):
    inputs = make_inputs(rng_seed, 9, 11, 30, 70)
    pw = jnp.asarray(PREFIX_WEIGHT_CASES[case](11), jnp.float32)
    value, grads = loss_and_grads(backend, config, inputs, pw)
    check_against_oracle(value, grads, inputs, pw)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_default_prefix_weights_are_the_seed_loss(backend, config, rng_seed):
    inputs = make_inputs(rng_seed, 8, 6, 16, 24)
    default = hsae_jax.hierarchical_sae_loss(*inputs, backend=backend, config=config)
    ones = hsae_jax.hierarchical_sae_loss(*inputs, prefix_weights=jnp.full(6, 4.0),
                                          backend=backend, config=config)
    # the seed: mean over B x K x D of (bias + cumsum(vals * W[idx]) - target)^2
    indices, weight, vals, bias, target = (np.asarray(x, np.float64) for x in inputs)
    recon = bias + np.cumsum(vals[..., None] * weight[indices.astype(int)], axis=1)
    seed_value = np.mean((recon - target[:, None, :]) ** 2)
    np.testing.assert_allclose(default, seed_value, rtol=2e-6)
    np.testing.assert_allclose(ones, seed_value, rtol=2e-6)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_topk_loss_is_the_full_reconstruction_error(backend, config, rng_seed):
    inputs = make_inputs(rng_seed, 10, 7, 25, 19)
    expected = decoder_loss_oracle(*inputs, prefix_weights=np.eye(7)[6])

    def f(weight, vals):
        return hsae_jax.topk_sae_loss(inputs[0], weight, vals, *inputs[3:], backend=backend,
                                      config=config)

    value, (dweight, dvals) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*inputs[1:3])
    assert_close_to_oracle("loss", value, expected["loss"], jnp.float32)
    assert_close_to_oracle("dweight", dweight, expected["weight"], jnp.float32)
    assert_close_to_oracle("dvals", dvals, expected["vals"], jnp.float32)


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("dtypes", ["float32", "bfloat16"])
def test_prefix_sse_is_the_squared_error_of_every_prefix(backend, config, dtypes, rng_seed):
    inputs = make_inputs(rng_seed, 13, 9, 21, 45, dtypes=DTYPE_CASES[dtypes])
    sse = jax.jit(lambda *a: hsae_jax.hierarchical_sae_prefix_sse(
        *a, backend=backend, config=config))(*inputs)
    chex.assert_shape(sse, (13, 9))
    chex.assert_type(sse, jnp.float32)
    assert_close_to_oracle("prefix_sse", sse, decoder_loss_oracle(*inputs)["prefix_sse"],
                           jnp.float32)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_out_of_range_indices_select_no_row(backend, config, rng_seed):
    """Indices < 0 or >= F contribute nothing and receive no gradient, on every backend."""
    indices, weight, vals, bias, target = make_inputs(rng_seed, 6, 10, 12, 20)
    bad = np.asarray(indices).copy()
    bad[0, 0], bad[1, 3], bad[2, 9], bad[5, :] = -1, 12, 10**6, -(10**6)
    inputs = (jnp.asarray(bad, jnp.int32), weight, vals, bias, target)
    value, grads = loss_and_grads(backend, config, inputs)
    check_against_oracle(value, grads, inputs)
    assert np.all(np.asarray(grads["vals"])[5] == 0.0)
    assert grads["vals"][0, 0] == 0.0 and grads["vals"][2, 9] == 0.0


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_int64_indices_match_int32(backend, config, rng_seed):
    with enable_x64():
        inputs = make_inputs(rng_seed, 4, 5, 9, 17, index_dtype=jnp.int64)
        assert inputs[0].dtype == jnp.int64
        value, grads = loss_and_grads(backend, config, inputs)
        check_against_oracle(value, grads, inputs)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_repeated_latents_in_a_row_accumulate(backend, config, rng_seed):
    """The same latent twice in one row, and hot latents shared by all rows."""
    indices, weight, vals, bias, target = make_inputs(rng_seed, 8, 6, 5, 16)
    hot = np.tile(np.array([[0, 1, 0, 2, 1, 0]]), (8, 1))
    inputs = (jnp.asarray(hot, jnp.int32), weight, vals, bias, target)
    value, grads = loss_and_grads(backend, config, inputs)
    check_against_oracle(value, grads, inputs)


def test_backends_agree_with_each_other(rng_seed):
    """chex tree comparison of xla against reference on the same inputs."""
    inputs = make_inputs(rng_seed, 12, 16, 40, 48)
    ref = loss_and_grads("reference", None, inputs)
    xla = loss_and_grads("xla", XlaLossConfig(chunk=5), inputs)
    chex.assert_trees_all_close(xla, ref, rtol=1e-5, atol=1e-8)


def test_xla_backend_passes_check_grads(rng_seed):
    indices, weight, vals, bias, target = make_inputs(rng_seed, 4, 6, 10, 8)

    def loss(weight, vals, bias, target):
        return hsae_jax.hierarchical_sae_loss(indices, weight, vals, bias, target,
                                              backend="xla", config=XlaLossConfig(chunk=4))

    jax.test_util.check_grads(loss, (weight, vals, bias, target), order=1, modes=["rev"],
                              eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend, config", [b for b in BACKENDS if b.values[0] in KERNELS])
def test_prefix_weight_gradient_costs_nothing_unless_used(backend, config, rng_seed):
    """The per-prefix SSE kernel behind d loss / d prefix_weights is compiled away when
    that gradient is not asked for: training pays for one fused kernel only."""
    indices, weight, vals, bias, target = make_inputs(rng_seed, 4, 5, 9, 17)

    def loss(weight, prefix_weights):
        return hsae_jax.hierarchical_sae_loss(indices, weight, vals, bias, target,
                                              prefix_weights=prefix_weights, backend=backend,
                                              config=config)

    def kernel_calls(argnums) -> int:
        hlo = jax.jit(jax.grad(loss, argnums=argnums)).lower(weight, jnp.ones(5)).compile()
        return len(re.findall(r"custom-call\(", hlo.as_text()))

    assert kernel_calls((0, 1)) == kernel_calls((0,)) + 1


KERNEL_CASES = [
    pytest.param("interpret", marks=requires_interpreter, id="interpret"),
    pytest.param("triton", marks=requires_gpu, id="triton"),
]


@pytest.mark.parametrize("backend", KERNEL_CASES)
def test_deterministic_mode_is_bitwise_reproducible(backend, rng_seed):
    """Hot latents (every row picks latent 0 first, half of them latent 1 last) collide in
    the weight gradient; with deterministic=True the loss and every gradient are the same
    bits on every run, and equal the atomic fused kernel's to rounding."""
    b, k, f, d = 96, 8, 40, 72
    indices, weight, vals, bias, target = make_inputs(rng_seed, b, k, f, d)
    indices = indices.at[:, 0].set(0).at[::2, k - 1].set(1)
    pw = jnp.asarray(np.random.default_rng(rng_seed).uniform(0.1, 1.0, k), jnp.float32)
    inputs = (indices, weight, vals, bias, target)
    runs = [loss_and_grads(backend, DETERMINISTIC, inputs, pw) for _ in range(3)]
    for value, grads in runs[1:]:
        np.testing.assert_array_equal(value, runs[0][0])
        for name in GRAD_NAMES:
            np.testing.assert_array_equal(grads[name], runs[0][1][name], err_msg=name)
    check_against_oracle(*runs[0], inputs, pw)
    atomic = loss_and_grads(backend, FUSED, inputs, pw)
    chex.assert_trees_all_close(runs[0], atomic, rtol=1e-5, atol=1e-7)


def test_deterministic_mode_needs_the_fused_kernel():
    with pytest.raises(ValueError, match="deterministic=True.*two_pass"):
        TritonLossConfig(variant="two_pass", deterministic=True)


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("dtypes", ["float32", "bfloat16"])
def test_loss_and_reconstruction_gives_the_loss_and_the_full_reconstruction(
        backend, config, dtypes, rng_seed):
    """The same loss value and gradients as hierarchical_sae_loss, and recon_K [B, D]
    float32 equal to the float64 oracle's (an out-of-range index adds nothing), with no
    gradient through it: what AuxK takes its residual from."""
    indices, weight, vals, bias, target = make_inputs(rng_seed, 9, 12, 30, 70,
                                                      dtypes=DTYPE_CASES[dtypes])
    indices = indices.at[2, 5].set(30).at[4, 0].set(-1)
    kw = dict(backend=backend, config=config)

    def with_recon(w, v, b):
        loss, recon = hsae_jax.loss.hierarchical_sae_loss_and_reconstruction(
            indices, w, v, b, target, **kw)
        return loss + jnp.sum(jnp.sin(recon)), (loss, recon)

    (_, (loss, recon)), grads = jax.jit(jax.value_and_grad(
        with_recon, argnums=(0, 1, 2), has_aux=True))(weight, vals, bias)
    plain, plain_grads = jax.jit(jax.value_and_grad(
        lambda w, v, b: hsae_jax.loss.hierarchical_sae_loss(indices, w, v, b, target, **kw),
        argnums=(0, 1, 2)))(weight, vals, bias)
    assert recon.shape == target.shape and recon.dtype == jnp.float32
    f64 = [np.asarray(x, np.float64) for x in (indices, weight, vals, bias)]
    ok = (f64[0] >= 0) & (f64[0] < weight.shape[0])
    rows = np.where(ok[..., None], f64[1][np.clip(f64[0], 0, weight.shape[0] - 1).astype(int)],
                    0.0)
    expected = f64[3] + np.sum(f64[2][..., None] * rows, axis=1)
    np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loss, plain)
    # recon adds no gradient: the same gradients, bit for bit where the kernels are
    # deterministic; on the GPU the weight gradient's float atomics add in any order
    exact = backend != "triton" or config.deterministic
    for got, want in zip(grads, plain_grads, strict=True):
        rtol = 1e-5 if got.dtype == jnp.float32 else 2.0 ** -7  # one bfloat16 rounding step
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            # atol: entries whose atomic sums nearly cancel, relative to the largest
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
