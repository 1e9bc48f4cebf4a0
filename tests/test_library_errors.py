"""Library calls that must answer right or fail clearly (issue 13, items 8 and 9): bad
budgets and inputs, prefix weights summing to 0 under jit, and the interpret backend
under vmap, higher-order autodiff and empty batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_inputs, requires_interpreter
from flax import nnx

from hsae_jax import (
    HierarchicalTopKSAE,
    SAEConfig,
    hierarchical_sae_loss,
    hierarchical_sae_prefix_sse,
    top_k,
    topk_encode,
)

CFG = SAEConfig(d_model=8, n_latents=16, k=4)


def encoder_inputs(b=3, f=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(f, d)), jnp.float32),
            jnp.asarray(rng.normal(size=f) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32))


# ------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_topk_encode_refuses_integer_inputs_and_bad_k(backend):
    x, w, b_enc, b_dec = encoder_inputs()
    with pytest.raises(TypeError, match="x has dtype int32"):
        topk_encode(x.astype(jnp.int32), w, b_enc, b_dec, 2, backend=backend)
    for k in (0, -1, 17, 2.0, True):
        with pytest.raises(ValueError, match=r"k=.* must be an int in \[1, F=16\]"):
            topk_encode(x, w, b_enc, b_dec, k, backend=backend)


def test_the_model_checks_budgets_and_samples():
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8))
    vals, indices = sae.encode(x)
    for k in (-1, 0, 5):
        with pytest.raises(ValueError, match=rf"k={k} must be an int in \[1, 4\]"):
            sae.decode(vals, indices, k=k)
    with pytest.raises(ValueError, match=r"k=0 must be an int in \[1, 16\]"):
        sae.encode(x, k=0)
    with pytest.raises(ValueError, match=r"sample must have shape \[N, D=8\], got \(4, 7\)"):
        HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.ones((4, 7)))
    with pytest.raises(ValueError, match="sample is all zeros"):
        HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.zeros((4, 8)))
    with pytest.raises(ValueError, match="sample has no finite rows"):
        HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.full((4, 8), jnp.nan))


@pytest.mark.parametrize("magnitude", [1e-25, 1.0, 1e30])
def test_the_input_scale_comes_from_finite_rows_at_any_magnitude(magnitude):
    rows = np.random.default_rng(0).normal(size=(64, 8)) * magnitude
    clean = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.asarray(rows, jnp.float32))
    poisoned = rows.copy()
    poisoned[7, 3], poisoned[9, 0] = np.nan, np.inf
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.asarray(poisoned, jnp.float32))
    scaled = np.asarray(rows[np.all(np.isfinite(poisoned), axis=1)], np.float64)
    scaled *= float(sae.input_scale[...])
    np.testing.assert_allclose(np.mean(np.sum(scaled**2, axis=1)), 8.0, rtol=1e-4)
    np.testing.assert_allclose(float(sae.input_scale[...]), float(clean.input_scale[...]),
                               rtol=0.1)
    assert np.all(np.isfinite(np.asarray(sae.b_dec[...])))
    assert np.isfinite(float(sae.loss(jnp.asarray(rows, jnp.float32))))
    with pytest.raises(ValueError, match="outside the 1e-30 to 1e\\+36"):
        HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=jnp.full((4, 8), 1e37))


@pytest.mark.parametrize("backend", [
    "xla", "reference", pytest.param("interpret", marks=requires_interpreter)])
def test_prefix_weights_summing_to_zero_give_zero_under_jit(backend):
    indices, weight, vals, bias, target = make_inputs(0, 4, 3, 16, 8)

    def loss(weight, vals, bias, target, prefix_weights):
        return hierarchical_sae_loss(indices, weight, vals, bias, target,
                                     prefix_weights=prefix_weights, backend=backend)

    zeros = jnp.zeros((3,), jnp.float32)
    with pytest.raises(ValueError, match="positive sum"):
        loss(weight, vals, bias, target, zeros)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(
        weight, vals, bias, target, zeros)
    assert float(value) == 0.0
    for g in grads[:4]:
        assert np.all(np.asarray(g) == 0)
    assert np.all(np.isfinite(np.asarray(grads[4])))


# ------------------------------------------------------------------------- item 9

def interpret_only(test):
    for mark in requires_interpreter:
        test = mark(test)
    return test


def allclose(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@interpret_only
def test_interpret_backend_supports_vmap():
    indices, weight, vals, bias, target = make_inputs(1, 4, 3, 16, 8)
    targets = jnp.stack([target, 2 * target])
    x, w, b_enc, b_dec = encoder_inputs()
    xs = jnp.stack([x, -x])
    results = {}
    for backend in ("interpret", "xla"):
        results[backend] = (
            jax.vmap(lambda t, be=backend: hierarchical_sae_loss(
                indices, weight, vals, bias, t, backend=be))(targets),
            jax.vmap(jax.grad(lambda t, be=backend: hierarchical_sae_loss(
                indices, weight, vals, bias, t, backend=be)))(targets),
            jax.vmap(lambda t, be=backend: hierarchical_sae_prefix_sse(
                indices, weight, vals, bias, t, backend=be))(targets),
            jax.vmap(lambda a, be=backend: top_k(a, 4, backend=be))(xs),
            jax.vmap(lambda a, be=backend: topk_encode(a, w, b_enc, b_dec, 2, backend=be))(xs),
            jax.vmap(jax.grad(lambda a, be=backend: topk_encode(
                a, w, b_enc, b_dec, 2, backend=be)[0].sum()))(xs),
        )
    jax.tree.map(allclose, results["interpret"], results["xla"])


@interpret_only
def test_prefix_sse_is_differentiable_on_the_kernel_backend():
    indices, weight, vals, bias, target = make_inputs(2, 4, 3, 16, 8)

    def sse(backend):
        return lambda w, v, b, t: jnp.sum(hierarchical_sae_prefix_sse(
            indices, w, v, b, t, backend=backend) ** 1.5)

    args = (weight, vals, bias, target)
    kernel, xla = sse("interpret"), sse("xla")
    jax.tree.map(allclose, jax.grad(kernel, argnums=(0, 1, 2, 3))(*args),
                 jax.grad(xla, argnums=(0, 1, 2, 3))(*args))
    allclose(jax.hessian(kernel, argnums=2)(*args), jax.hessian(xla, argnums=2)(*args))
    tangent = jnp.ones_like(bias)
    jax.tree.map(allclose, jax.jvp(lambda b: kernel(weight, vals, b, target), (bias,),
                                   (tangent,)),
                 jax.jvp(lambda b: xla(weight, vals, b, target), (bias,), (tangent,)))


@interpret_only
def test_forward_mode_through_a_kernel_names_the_backend():
    indices, weight, vals, bias, target = make_inputs(3, 4, 3, 16, 8)
    loss = lambda b: hierarchical_sae_loss(indices, weight, vals, b, target,
                                           backend="interpret")
    with pytest.raises(NotImplementedError, match="backend='interpret'.*use backend='xla'"):
        jax.hessian(loss)(bias)
    x, w, b_enc, b_dec = encoder_inputs()
    with pytest.raises(NotImplementedError, match="backend='interpret'.*use backend='xla'"):
        jax.hessian(lambda b: topk_encode(x, w, b_enc, b, 2, backend="interpret")[0].sum())(
            b_dec)


@pytest.mark.parametrize("backend", [
    "xla", "reference", pytest.param("interpret", marks=requires_interpreter)])
def test_an_empty_batch_gives_empty_results(backend):
    x, w, b_enc, b_dec = encoder_inputs(b=0)
    values, indices = top_k(jnp.ones((0, 16)), 4, backend=backend)
    assert values.shape == indices.shape == (0, 4)
    vals, idx = topk_encode(x, w, b_enc, b_dec, 2, backend=backend)
    assert vals.shape == idx.shape == (0, 2)
    grads = jax.grad(lambda w, b: topk_encode(x, w, b_enc, b, 2, backend=backend)[0].sum(),
                     argnums=(0, 1))(w, b_dec)
    assert all(np.all(np.asarray(g) == 0) for g in grads)
