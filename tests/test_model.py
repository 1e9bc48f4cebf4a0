"""HierarchicalTopKSAE: encode/decode semantics, decoder constraints, persistence."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsae_jax import HierarchicalTopKSAE, KernelSettings, SAEConfig
from hsae_jax.model import normalize_decoder, project_decoder_grad

CFG = SAEConfig(d_model=12, n_latents=40, k=6)
XLA = KernelSettings("xla")


def sample(seed=0, n=64, d=12):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) * 3 + 1, jnp.float32)


def test_initialisation_follows_topk_sae_practice():
    x = sample()
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=x, kernels=XLA)
    norms = np.linalg.norm(np.asarray(sae.W_dec[...]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sae.W_enc[...]), np.asarray(sae.W_dec[...]))
    scale = float(sae.input_scale[...])
    np.testing.assert_allclose(np.mean(np.sum((np.asarray(x) * scale) ** 2, 1)), 12, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sae.b_dec[...]), np.asarray(x).mean(0) * scale,
                               rtol=1e-5)


def test_decode_at_budget_k_uses_the_first_k_latents():
    x = sample(1)
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(1), sample=x, kernels=XLA)
    vals, indices = sae.encode(x)
    chex.assert_shape([vals, indices], (64, 6))
    assert np.all(np.diff(np.asarray(vals), axis=1) <= 0) and np.all(np.asarray(vals) >= 0)
    w, b, s = (np.asarray(a, np.float64) for a in (sae.W_dec[...], sae.b_dec[...],
                                                    sae.input_scale[...]))
    for k in (1, 3, 6):
        expected = (b + np.einsum("bk,bkd->bd", np.asarray(vals[:, :k], np.float64),
                                  w[np.asarray(indices[:, :k])])) / s
        np.testing.assert_allclose(sae.decode(vals, indices, k), expected, rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(sae(x, k=3), sae.decode(vals, indices, 3), rtol=1e-6)


def test_encode_can_use_more_latents_than_trained_with():
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=sample(), kernels=XLA)
    vals, _ = sae.encode(sample(2), k=10)
    assert vals.shape == (64, 10)


def test_decoder_gradient_projection_is_orthogonal_to_rows():
    rng = np.random.default_rng(0)
    w = normalize_decoder(jnp.asarray(rng.normal(size=(30, 8)), jnp.float32))
    g = project_decoder_grad(w, jnp.asarray(rng.normal(size=(30, 8)), jnp.float32))
    np.testing.assert_allclose(np.sum(np.asarray(g * w), axis=1), 0.0, atol=1e-6)


def test_save_then_load_gives_the_same_model(tmp_path):
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(3), sample=sample(), kernels=XLA)
    sae.save(str(tmp_path))
    loaded = HierarchicalTopKSAE.load(str(tmp_path), XLA)
    assert loaded.cfg == sae.cfg
    chex.assert_trees_all_equal(loaded.params(), sae.params())
    assert float(loaded.input_scale[...]) == float(sae.input_scale[...])
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "sae.safetensors"))
    assert tensors["W_enc"].shape == (12, 40)  # the conventional [D, F] layout on disk
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_loading_a_file_of_the_wrong_shape_is_refused(tmp_path):
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(3), sample=sample(), kernels=XLA)
    sae.save(str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["n_latents"] = 41
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc is \(12, 40\), expected \(12, 41\)"):
        HierarchicalTopKSAE.load(str(tmp_path), XLA)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=41), "k=41 must be <= SAEConfig.n_latents=40"),
    (dict(objective="l1"), "objective='l1'"),
    (dict(budgets=(0, 3)), r"budgets=\(0, 3\)"),
    (dict(compute_dtype="float16"), "compute_dtype='float16'"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{**dict(d_model=12, n_latents=40, k=6), **kwargs})


def test_model_works_with_an_nnx_optimizer():
    """The module is an ordinary NNX module: nnx.Optimizer + nnx.jit train it."""
    import optax

    x = sample()
    sae = HierarchicalTopKSAE(CFG, rngs=nnx.Rngs(0), sample=x, kernels=XLA)
    optimizer = nnx.Optimizer(sae, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(sae, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(x))(sae)
        optimizer.update(sae, grads)
        return loss

    losses = [float(step(sae, optimizer, x)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_compute_keeps_float32_masters():
    cfg = SAEConfig(d_model=12, n_latents=40, k=6, compute_dtype="bfloat16")
    sae = HierarchicalTopKSAE(cfg, rngs=nnx.Rngs(0), sample=sample(), kernels=XLA)
    grads = jax.grad(lambda p: __import__("hsae_jax").model.sae_loss(
        cfg, p, sae.stats(), sample(4), XLA)[0])(sae.params())
    for name, g in grads.items():
        assert g.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("f, rows", [(50, 7), (50, 50), (3, 8)])
def test_mean_max_cosine_equals_the_float64_oracle_block_by_block(f, rows):
    """The best cosine per true feature, taken over decoder rows ``rows`` at a time (the
    last block overlapping the one before), equals the whole-matrix float64 answer; with
    every similarity negative too."""
    from hsae_jax.evaluate import mean_max_cosine

    rng = np.random.default_rng(f * 100 + rows)
    w_dec = rng.normal(size=(f, 16)).astype(np.float32)
    true = rng.normal(size=(40, 16)).astype(np.float32)
    # rows all positive against features all negative: every cosine < 0
    for w, t in ((w_dec, true), (np.abs(w_dec), -np.abs(true))):
        wn = w / np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True)
        tn = t / np.linalg.norm(t.astype(np.float64), axis=1, keepdims=True)
        want = np.mean(np.max(tn @ wn.T, axis=1))
        got = mean_max_cosine(jnp.asarray(w), jnp.asarray(t), rows=rows)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert want < 0  # the last case: all negative, and nothing else (a 0) may win


@pytest.mark.parametrize("f", [2**20, 2**20 + 1])
def test_mean_max_cosine_needs_one_block_of_similarities_not_all_of_them(f):
    """At F = 2^20 decoder rows and 2^14 true features the [n, F] similarities are 64 GiB
    and W_dec is 2 GiB (D = 512); the compiled evaluation holds one [n, 8192] block, under
    1 GiB, also when F is not a multiple of the block (no padded copy of W_dec). Shapes
    only: nothing is allocated."""
    from hsae_jax.evaluate import COSINE_ROWS, _mean_max_cosine

    w = jax.ShapeDtypeStruct((f, 512), jnp.float32)
    t = jax.ShapeDtypeStruct((2**14, 512), jnp.float32)
    memory = _mean_max_cosine.lower(w, t, COSINE_ROWS).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 2**30, memory.temp_size_in_bytes
