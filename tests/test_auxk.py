"""AuxK on the dead latents' columns equals its definition: value and every gradient."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error, requires_gpu, requires_interpreter

from hsae_jax import KernelSettings, SAEConfig
from hsae_jax.auxk import (
    auxk_dot,
    auxk_loss,
    auxk_loss_and_add_grads,
    auxk_loss_reference,
    bucket_index,
    column_buckets,
    static_bucket_index,
)
from hsae_jax.model import encode_arrays, init_arrays, sae_loss, sae_loss_and_grads, scale_inputs

BACKENDS = [
    pytest.param("xla", id="xla"),
    pytest.param("interpret", marks=requires_interpreter, id="interpret"),
    pytest.param("triton", marks=requires_gpu, id="triton"),
]


def setup(seed, f=64, d=16, k=4, aux_k=None, b=24, compute_dtype="float32",
          auxk_dtype="float32"):
    cfg = SAEConfig(d_model=d, n_latents=f, k=k, aux_k=aux_k, compute_dtype=compute_dtype,
                    auxk_dtype=auxk_dtype)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, d)) * 2 + 0.5, jnp.float32)
    params, stats = init_arrays(cfg, jax.random.key(seed), x)
    # trained-looking parameters: encoder rows not equal to the decoder's, non-zero biases
    params = {**params,
              "W_enc": params["W_enc"] + 0.3 * jnp.asarray(rng.normal(size=(f, d)), jnp.float32),
              "b_enc": jnp.asarray(rng.normal(size=f) * 0.2, jnp.float32)}
    return cfg, params, stats, x


def both(cfg, params, stats, x, dead, backend):
    """(value, grads) of the fast AuxK on ``backend`` and of its reference (on xla, the
    definition in plain JAX), on the same main selection."""
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=KernelSettings("xla"))
    out = []
    # full float32 matmuls on both sides (a GPU's default is TF32, which the Triton
    # decoder loss of the reference does not use)
    with jax.default_matmul_precision("highest"):
        for fn, on in ((auxk_loss, backend), (auxk_loss_reference, "xla")):
            out.append(jax.jit(jax.value_and_grad(
                lambda p, fn=fn, on=on: fn(cfg, p, xs, vals, indices, dead,
                                           KernelSettings(on))))(params))
    return out


def dead_mask(f, which):
    return jnp.zeros((f,), jnp.bool_).at[jnp.asarray(which, jnp.int32)].set(True)


CASES = {  # name: (F, aux_k, dead latents)
    "one dead": (64, 8, [17]),
    "all dead": (64, 8, list(range(64))),
    "10% dead, more than aux_k": (64, 4, [3, 9, 10, 30, 41, 63]),
    "fewer dead than aux_k": (64, 8, [0, 5, 6]),
    "dead in a middle bucket": (256, 6, list(range(5, 250, 13))),
    "aux_k above every bucket but F": (256, 100, list(range(0, 256, 2))),
}


# the interpreter (slow) takes one case of each path: all dead selected / a top-k of them
INTERPRETED = ("one dead", "10% dead, more than aux_k")


def case_params():
    for case in CASES:
        for backend in BACKENDS:
            marks = list(backend.marks)
            if backend.values[0] == "interpret" and case not in INTERPRETED:
                marks.append(pytest.mark.slow)
            yield pytest.param(backend.values[0], case, marks=marks,
                               id=f"{case}-{backend.id}")


@pytest.mark.parametrize("backend, case", list(case_params()))
def test_value_and_gradients_equal_the_definition(backend, case, rng_seed):
    f, aux_k, which = CASES[case]
    cfg, params, stats, x = setup(rng_seed, f=f, aux_k=aux_k)
    (value, grads), (ref_value, ref_grads) = both(cfg, params, stats, x, dead_mask(f, which),
                                                  backend)
    assert float(ref_value) > 0
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=2e-4, atol=1e-6)
    live = np.setdiff1d(np.arange(f), which)
    for name in ("W_enc", "W_dec", "b_enc"):  # only dead latents' rows move
        assert np.all(np.asarray(grads[name])[live] == 0), name
    assert np.any(np.asarray(grads["W_enc"])[which] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dead_latent_means_no_loss_and_no_gradient(backend, rng_seed):
    cfg, params, stats, x = setup(rng_seed)
    (value, grads), (ref_value, _) = both(cfg, params, stats, x, dead_mask(64, []), backend)
    assert float(value) == 0.0 == float(ref_value)
    for g in jax.tree.leaves(grads):
        assert np.all(np.asarray(g) == 0)


def test_bf16_compute_matches_the_definition(rng_seed):
    cfg, params, stats, x = setup(rng_seed, aux_k=4, compute_dtype="bfloat16")
    (value, grads), (ref_value, ref_grads) = both(cfg, params, stats, x,
                                                  dead_mask(64, [1, 2, 40, 41, 50, 60]), "xla")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name in grads:  # both round the bf16 weight gradients, in different orders
        assert relative_error(grads[name], ref_grads[name]) < 1e-2, name


def test_bf16_auxk_products_round_every_operand_and_the_cotangent(rng_seed):
    """auxk_dot("bfloat16"): the product and both gradients are the float64 products of
    bfloat16-rounded operands (and cotangent), to float32 accumulation."""
    rng = np.random.default_rng(rng_seed)
    a, b, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((33, 70), (70, 19),
                                                                        (33, 19)))
    out, vjp = jax.vjp(lambda a, b: auxk_dot("bfloat16", a, b), a, b)
    da, db = vjp(g)

    def r(v):
        return np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)

    for got, want in ((out, r(a) @ r(b)), (da, r(g) @ r(b).T), (db, r(a).T @ r(g))):
        assert got.dtype == jnp.float32
        assert relative_error(got, want) < 1e-6
    # float32: the operands as they are
    exact, vjp32 = jax.vjp(lambda a, b: auxk_dot("float32", a, b), a, b)
    with jax.default_matmul_precision("highest"):
        assert relative_error(exact, np.asarray(a, np.float64) @ np.asarray(b, np.float64)) < 1e-6
    assert relative_error(out, exact) > 1e-4  # bfloat16 rounding is really there


def _bf16(v):
    """float64 copy of ``v`` rounded to bfloat16."""
    return np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)


def bf16_auxk_oracle(cfg, params, xs, vals, indices, which):
    """float64 NumPy AuxK (loss, gradients) with every product's operands (and cotangent)
    rounded to bfloat16, as ``auxk_dtype="bfloat16"`` computes them; for aux_k at least
    the number of dead latents ``which`` (all of them active through the ReLU)."""
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    x = np.asarray(xs, np.float64)
    w_dec = p["W_dec"][which]
    recon_main = p["b_dec"] + np.einsum("bk,bkd->bd", np.asarray(vals, np.float64),
                                        p["W_dec"][np.asarray(indices)])
    residual = x - recon_main
    xc = x - p["b_dec"]
    pre = _bf16(xc) @ _bf16(p["W_enc"][which]).T + p["b_enc"][which]  # [B, n]
    acts = np.maximum(pre, 0)
    recon = _bf16(acts) @ _bf16(w_dec)
    variance = np.mean((residual - residual.mean(axis=0)) ** 2)
    scale = min(len(which) / cfg.resolved_aux_k, 1.0) / variance
    loss = scale * np.mean((residual - recon) ** 2)
    d_recon = scale * 2 * (recon - residual) / residual.size
    d_pre = (_bf16(d_recon) @ _bf16(w_dec).T) * (pre > 0)
    grads = {name: np.zeros_like(v) for name, v in p.items()}
    grads["W_dec"][which] = _bf16(acts).T @ _bf16(d_recon)
    grads["W_enc"][which] = _bf16(d_pre).T @ _bf16(xc)
    grads["b_enc"][which] = d_pre.sum(axis=0)
    grads["b_dec"] = -d_pre.sum(axis=0) @ p["W_enc"][which]
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_auxk_products_round_where_the_oracle_does(backend, rng_seed):
    """auxk_dtype="bfloat16": the loss and every gradient are the float64 oracle's that
    rounds each product's operands to bfloat16 (aux_k holds every dead latent, so no
    selection can flip on a rounding), and only dead latents' rows move. Against the float32
    definition the gradients are only near (W_enc's was 2.5-4.4% away for some seeds: the sum
    over B cancels)."""
    which = [3, 9, 10, 30, 41, 63]
    cfg, params, stats, x = setup(rng_seed, aux_k=8, auxk_dtype="bfloat16")
    (value, grads), (ref_value, ref_grads) = both(cfg, params, stats, x,
                                                  dead_mask(64, which), backend)
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=KernelSettings("xla"))
    want_value, want = bf16_auxk_oracle(cfg, params, xs, vals, indices, which)
    assert relative_error(value, want_value) < 1e-5
    for name in grads:
        assert relative_error(grads[name], want[name]) < 1e-4, name
        assert relative_error(grads[name], ref_grads[name]) < 0.1, name
    assert relative_error(value, ref_value) < 1e-2
    live = np.setdiff1d(np.arange(64), which)
    for name in ("W_enc", "W_dec", "b_enc"):
        assert np.all(np.asarray(grads[name])[live] == 0), name


def test_buckets_hold_any_number_of_dead_latents():
    assert column_buckets(65536) == (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    assert column_buckets(3) == (1, 3)
    assert column_buckets(65536, 0.25) == (1024, 2048, 4096, 8192, 16384)
    assert column_buckets(65536, 0.25, (64, 16, 4, 1)) == (1024, 4096, 16384)
    assert column_buckets(65536, 1 / 64) == (1024,)


def test_a_count_of_dead_latents_picks_the_smallest_bucket_that_holds_it():
    buckets = column_buckets(65536)
    counts = [0, 1, 1023, 1024, 1025, 6553, 8192, 8193, 65535, 65536, 65537, 100000]
    got = [int(bucket_index(buckets, jnp.int32(c))) for c in counts]
    assert got == [0, 1, 1, 1, 2, 4, 4, 5, 7, 7, 8, 8]  # 8: beyond the largest (clamped)
    for c, i in zip(counts[1:], got[1:], strict=True):  # as jnp.searchsorted would say
        assert i == 1 + int(jnp.searchsorted(jnp.asarray(buckets), c))
    # on the host (the trainer's static bucket), beyond the largest the largest
    assert [static_bucket_index(buckets, c) for c in counts] == [min(i, 7) for i in got]


def test_a_capped_auxk_uses_the_lowest_numbered_dead_latents(rng_seed):
    """auxk_max_fraction=1/4 with 40 of 64 latents dead: AuxK on the first 16 of them
    (the scale min(n_dead / aux_k, 1) is 1 either way)."""
    import dataclasses

    cfg, params, stats, x = setup(rng_seed, aux_k=4)
    capped = dataclasses.replace(cfg, auxk_max_fraction=0.25)
    dead = list(range(1, 64, 3)) + list(range(2, 60, 3))[:19]
    assert len(dead) == 40
    first = sorted(dead)[:16]
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=KernelSettings("xla"))
    kernels = KernelSettings("xla")
    value, grads = jax.value_and_grad(lambda p: auxk_loss(
        capped, p, xs, vals, indices, dead_mask(64, dead), kernels))(params)
    ref, ref_grads = jax.value_and_grad(lambda p: auxk_loss_reference(
        cfg, p, xs, vals, indices, dead_mask(64, first), kernels))(params)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="auxk_max_fraction"):
        SAEConfig(auxk_max_fraction=0.3)


def test_the_training_objective_adds_auxk_only_with_dead_latents(rng_seed):
    cfg, params, stats, x = setup(rng_seed, aux_k=4)
    kernels = KernelSettings("xla")
    alive = {**stats, "tokens_since_fired": jnp.zeros((64,), jnp.int32)}
    loss, aux = sae_loss(cfg, params, alive, x, kernels)
    assert float(aux["auxk_loss"]) == 0 and int(aux["num_dead"]) == 0
    dead = {**stats, "tokens_since_fired": jnp.zeros((64,), jnp.int32).at[:10].set(
        cfg.dead_tokens)}
    loss_dead, aux_dead = sae_loss(cfg, params, dead, x, kernels)
    assert int(aux_dead["num_dead"]) == 10 and float(aux_dead["auxk_loss"]) > 0
    np.testing.assert_allclose(loss_dead, aux_dead["recon_loss"]
                               + cfg.auxk_coef * aux_dead["auxk_loss"], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trainer_adds_auxk_gradients_in_place_to_the_dead_rows(backend, rng_seed):
    cfg, params, stats, x = setup(rng_seed, aux_k=4)
    dead = dead_mask(64, [2, 11, 12, 40, 41, 42, 63])
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=KernelSettings("xla"))
    rng = np.random.default_rng(rng_seed)
    grads = {n: jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) for n, p in params.items()}
    with jax.default_matmul_precision("highest"):
        value, added = jax.jit(lambda p, g: auxk_loss_and_add_grads(
            cfg, p, xs, vals, indices, dead, g, KernelSettings(backend)))(params, grads)
        ref_value, ref_grads = jax.value_and_grad(lambda p: auxk_loss_reference(
            cfg, p, xs, vals, indices, dead, KernelSettings("xla")))(params)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    expected = jax.tree.map(lambda g, r: g + cfg.auxk_coef * r, grads, ref_grads)
    chex.assert_trees_all_close(added, expected, rtol=2e-5, atol=1e-6)
    # the bucket named on the host: 7 dead latents need bucket 4 (8 columns of 64); any
    # larger one adds padding columns only
    assert column_buckets(64)[3] == 8
    for bucket in (4, 5, len(column_buckets(64))):
        with jax.default_matmul_precision("highest"):
            static_value, static = jax.jit(lambda p, g, bucket=bucket: auxk_loss_and_add_grads(
                cfg, p, xs, vals, indices, dead, g, KernelSettings(backend), bucket))(
                    params, grads)
        np.testing.assert_allclose(static_value, value, rtol=1e-6)
        chex.assert_trees_all_close(static, added, rtol=1e-6, atol=1e-7)
    none_dead = jnp.zeros((64,), bool)
    for bucket in (None, 0):
        value, same = jax.jit(lambda p, g, bucket=bucket: auxk_loss_and_add_grads(
            cfg, p, xs, vals, indices, none_dead, g, KernelSettings(backend), bucket))(
                params, grads)
        assert float(value) == 0.0
        chex.assert_trees_all_equal(same, grads)


@pytest.mark.parametrize("dead", [[], [5, 6, 30]])
def test_the_trainers_loss_and_gradients_are_those_of_sae_loss(dead, rng_seed):
    cfg, params, stats, x = setup(rng_seed, aux_k=4)
    stats = {**stats, "tokens_since_fired": jnp.zeros((64,), jnp.int32).at[
        jnp.asarray(dead, jnp.int32)].set(cfg.dead_tokens)}
    kernels = KernelSettings("xla")
    with jax.default_matmul_precision("highest"):
        (loss, aux), grads = jax.jit(lambda p: sae_loss_and_grads(cfg, p, stats, x, kernels))(
            params)
        (ref_loss, ref_aux), ref_grads = jax.value_and_grad(
            lambda p: sae_loss(cfg, p, stats, x, kernels), has_aux=True)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["auxk_loss"], ref_aux["auxk_loss"], rtol=1e-6)
    assert (float(aux["auxk_loss"]) > 0) == bool(dead)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
