"""The seed's own two kernels, unmodified, launched through jax-triton on the loss
benchmark's data, beside hsae-jax's two_pass port and fused kernel.

Separates kernel differences from harness differences: the same indices, weights and
timing loop for all three; the seed's kernels need B % 16 == 0, D % 64 == 0 and a
power-of-two K. Prints a markdown table and writes JSON.
Usage: python benchmarks/seed_via_jax_triton.py --seed-module .seed/hierarchical_kernels.py
       [--ks 32,128] [--distributions uniform,zipf] [--backend triton|interpret]
       [--batch 4096 --n-latents 65536 --d-model 2304] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import TritonLossConfig, backends, hierarchical_sae_loss
from hsae_jax.bench import common
from hsae_jax.bench.loss import load_seed_module
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.triton_launch import launch

# the seed's launch settings (its torch wrappers)
FORWARD = dict(BLOCK_D=64, LOOP_NUM_STAGES=4, BLOCK_B=1, num_warps=2, num_stages=2)
BACKWARD = dict(BLOCK_D=32, LOOP_NUM_STAGES=16, BLOCK_B=16, num_warps=8, num_stages=8)


def make_kernels(seed_path: str, backend: str):
    """jax-triton-order wrappers (inputs first, then outputs) around the seed's kernels."""
    global tl, SEED_FORWARD, SEED_BACKWARD, seed_forward, seed_backward
    triton = backends.import_triton("interpret" if backend == "interpret" else "compiled")
    import triton.language as tl

    seed = load_seed_module(seed_path)
    SEED_FORWARD = seed.hierarchical_sae_forward_kernel
    SEED_BACKWARD = seed.hierarchical_sae_backward_kernel

    @triton.jit
    def seed_forward(indices_ptr, weight_ptr, bias_ptr, vals_ptr, target_ptr, loss_ptr,
                     recon_ptr, B: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                     BLOCK_D: tl.constexpr, LOOP_NUM_STAGES: tl.constexpr,
                     BLOCK_B: tl.constexpr):
        SEED_FORWARD(loss_ptr, recon_ptr, indices_ptr, weight_ptr, bias_ptr, vals_ptr,
                     target_ptr, B, D, K, BLOCK_D, LOOP_NUM_STAGES, BLOCK_B)

    @triton.jit
    def seed_backward(recon_ptr, indices_ptr, weight_ptr, vals_ptr, target_ptr, dw_ptr,
                      dvals_ptr, db_ptr, B: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                      BLOCK_D: tl.constexpr, LOOP_NUM_STAGES: tl.constexpr,
                      BLOCK_B: tl.constexpr):
        SEED_BACKWARD(dw_ptr, dvals_ptr, db_ptr, recon_ptr, indices_ptr, weight_ptr, vals_ptr,
                      target_ptr, B, D, K, BLOCK_D, LOOP_NUM_STAGES, BLOCK_B)


def seed_loss(backend: str):
    """The seed's loss (mean over B, K, D of every prefix's squared error) as a custom_vjp."""

    def forward(indices, weight, vals, bias, target):
        (b, k), d = indices.shape, weight.shape[1]
        grid = (b // FORWARD["BLOCK_B"], d // FORWARD["BLOCK_D"])
        loss_rows, recon = launch(
            seed_forward, indices, weight, bias, vals, target,
            out_shape=[jax.ShapeDtypeStruct((b,), jnp.float32),
                       jax.ShapeDtypeStruct((b, d), jnp.float32)],
            grid=grid, backend=backend, zeroed_outputs=(0,), B=b, D=d, K=k, **FORWARD)
        return jnp.sum(loss_rows) / (b * k * d), recon

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
    def loss(indices, weight, vals, bias, target):
        return forward(indices, weight, vals, bias, target)[0]

    def fwd(indices, weight, vals, bias, target):
        value, recon = forward(indices, weight, vals, bias, target)
        return value, (weight, vals, recon)

    def bwd(indices, target, saved, g):
        weight, vals, recon = saved
        (b, k), (f, d) = indices.shape, weight.shape
        dw, dvals, db = launch(
            seed_backward, recon, indices, weight, vals, target,
            out_shape=[jax.ShapeDtypeStruct((f, d), jnp.float32),
                       jax.ShapeDtypeStruct((b, k), jnp.float32),
                       jax.ShapeDtypeStruct((d,), jnp.float32)],
            grid=(b // BACKWARD["BLOCK_B"], d // BACKWARD["BLOCK_D"]), backend=backend,
            zeroed_outputs=(0, 1, 2), B=b, D=d, K=k, **BACKWARD)
        return dw * g, dvals * g, db * g

    loss.defvjp(fwd, bwd)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed-module", required=True)
    parser.add_argument("--ks", default="32,128")
    parser.add_argument("--distributions", default="uniform,zipf")
    parser.add_argument("--backend", default="triton", choices=["triton", "interpret"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="seed_via_jax_triton.json")
    args = parser.parse_args()
    make_kernels(args.seed_module, args.backend)
    b, f, d = args.batch, args.n_latents, args.d_model
    key = jax.random.key(0)
    weight = jax.random.normal(key, (f, d)) / np.sqrt(d)
    bias = jnp.zeros((d,)) + 0.1
    target = jax.random.normal(jax.random.fold_in(key, 1), (b, d))
    seed = seed_loss(args.backend)
    rows = []
    for k in (int(s) for s in args.ks.split(",")):
        vals = jax.random.uniform(jax.random.fold_in(key, 2), (b, k))
        for dist in args.distributions.split(","):
            indices = common.sample_indices(jax.random.fold_in(key, k), b, f, k, dist)
            impls = {
                "seed kernels via jax-triton": lambda w, v, bb, i=indices: seed(i, w, v, bb,
                                                                                 target),
            }
            for variant in ("two_pass", "fused"):
                cfg = TritonLossConfig(variant=variant)
                impls[f"hsae {variant}"] = (
                    lambda w, v, bb, i=indices, c=cfg: hierarchical_sae_loss(
                        i, w, v, bb, target, backend=args.backend, config=c))
            results = {}
            for name, fn in impls.items():
                step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
                results[name] = step(weight, vals, bias)
                row = dict(k=k, distribution=dist, impl=name)
                row.update(common.time_calls(lambda s=step, v=vals: s(weight, v, bias),
                                             warmup=2, iters=args.iters))
                print(row, flush=True)
                rows.append(row)
                forward = jax.jit(fn)  # the forward kernel alone (no gradient requested)
                row = dict(k=k, distribution=dist, impl=f"{name} (forward only)")
                row.update(common.time_calls(lambda s=forward, v=vals: s(weight, v, bias),
                                             warmup=2, iters=args.iters))
                print(row, flush=True)
                rows.append(row)
            # the seed's loss is the plain mean over K prefixes, as hsae's default
            ref = results["hsae fused"]
            for name, (value, grads) in results.items():
                err = max(float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
                          for a, r in zip(jax.tree.leaves((value, grads)),
                                          jax.tree.leaves(ref), strict=True))
                for row in rows:
                    if (row["k"], row["distribution"], row["impl"]) == (k, dist, name):
                        row["max_rel_err_vs_fused"] = err
    print(common.markdown_table(rows, [
        ("k", "K", "d"), ("distribution", "indices", "s"), ("impl", "implementation", "s"),
        ("median_ms", "median ms", ".3f"), ("p90_ms", "p90 ms", ".3f"),
        ("max_rel_err_vs_fused", "max rel err vs fused", ".1e")]))
    atomic_write_json(args.out, {"rows": rows, **common.device_info()})


if __name__ == "__main__":
    main()
