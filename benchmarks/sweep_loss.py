"""Times decoder-loss kernel variants and block sizes on a GPU, with the seed as baseline.

Prints a markdown table per (K, distribution) and writes JSON; the winners set the
defaults in hsae_jax/loss/config.py.
Usage: python benchmarks/sweep_loss.py [--ks 32,128] [--distributions uniform,zipf]
       [--dtype float32] [--seed-module .seed/hierarchical_kernels.py] [--out FILE]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import (
    TritonLossConfig,
    WalkConfig,
    hierarchical_sae_loss,
    hierarchical_sae_prefix_sse,
)
from hsae_jax.bench import common
from hsae_jax.bench.loss import _seed_torch_runner, load_seed_module
from hsae_jax.io_utils import atomic_write_json

# (block_b, block_d, num_warps, loop_num_stages) tried for each walk kernel
FUSED = [(4, 128, 4, 4), (4, 128, 4, 3), (4, 128, 4, 6), (2, 128, 4, 4), (8, 128, 8, 4),
         (8, 64, 4, 4), (4, 64, 2, 4), (2, 256, 4, 4), (4, 256, 8, 4), (16, 32, 8, 8),
         (1, 64, 2, 4)]
FORWARD = [(1, 64, 2, 4), (1, 64, 2, 2), (1, 64, 2, 8), (1, 128, 4, 4), (2, 128, 4, 4),
           (4, 128, 4, 4), (4, 64, 2, 4)]
BACKWARD = [(16, 32, 8, 16), (16, 32, 8, 4), (4, 128, 4, 4), (8, 64, 4, 4), (2, 128, 4, 4)]


def candidates(k: int):
    del k
    yield "two_pass", TritonLossConfig(variant="two_pass")
    yield "prefix-sse", TritonLossConfig()
    for bb, bd, warps, loop_stages in FORWARD:
        yield "forward-only two_pass", TritonLossConfig(
            variant="two_pass", forward=WalkConfig(
                block_b=bb, block_d=bd, num_warps=warps, loop_num_stages=loop_stages))
    for bb, bd, warps, loop_stages in BACKWARD:
        yield "two_pass", TritonLossConfig(
            variant="two_pass", backward=WalkConfig(
                block_b=bb, block_d=bd, num_warps=warps, loop_num_stages=loop_stages,
                num_stages=8))
    for bb, bd, warps, loop_stages in FUSED:
        yield "fused", TritonLossConfig(variant="fused", fused=WalkConfig(
            block_b=bb, block_d=bd, num_warps=warps, loop_num_stages=loop_stages))


def describe(variant: str, config: TritonLossConfig) -> str:
    if variant == "fused":
        c = config.fused
        return f"BB={c.block_b} BD={c.block_d} w={c.num_warps} loop_st={c.loop_num_stages}"
    if variant == "prefix-sse":
        return "tile kernel, per-shape defaults"
    if variant == "seed-torch":
        return "seed (torch)"
    f, b = config.forward, config.backward
    return (f"fwd BB={f.block_b} BD={f.block_d} w={f.num_warps} loop_st={f.loop_num_stages}; "
            f"bwd BB={b.block_b} BD={b.block_d} w={b.num_warps} loop_st={b.loop_num_stages}")


def _loss_fn(variant, config, indices, target):
    """What one timed call runs: forward only, or value and gradients."""
    if variant == "prefix-sse":
        return lambda w, v, b: hierarchical_sae_prefix_sse(indices, w, v, b, target,
                                                           backend="triton", config=config)

    def loss(w, v, b):
        return hierarchical_sae_loss(indices, w, v, b, target, backend="triton", config=config)

    if variant.startswith("forward-only"):
        return loss
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="32,128")
    parser.add_argument("--distributions", default="uniform,zipf")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed-module")
    parser.add_argument("--out", default="sweep_loss.json")
    args = parser.parse_args()
    b, f, d = args.batch, args.n_latents, args.d_model
    key = jax.random.key(0)
    weight = (jax.random.normal(key, (f, d)) / np.sqrt(d)).astype(args.dtype)
    bias = jnp.zeros((d,), args.dtype) + 0.1
    target = jax.random.normal(jax.random.fold_in(key, 1), (b, d)).astype(args.dtype)
    seed_kernels = load_seed_module(args.seed_module) if args.seed_module else None
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for dist in args.distributions.split(","):
            indices = common.sample_indices(jax.random.fold_in(key, k), b, f, k, dist)
            vals = jax.random.uniform(jax.random.fold_in(key, 2), (b, k)).astype(args.dtype)
            cases = list(candidates(k))
            if seed_kernels is not None:
                cases.insert(0, ("seed-torch", None))
            for variant, config in cases:
                row = dict(k=k, distribution=dist, variant=variant,
                           config=describe(variant, config))
                try:
                    if variant == "seed-torch":
                        fn, sync, _, _ = _seed_torch_runner(seed_kernels, weight, vals, bias,
                                                            indices, target)
                        row.update(common.time_calls(fn, warmup=2, iters=args.iters, sync=sync))
                    else:
                        step = jax.jit(_loss_fn(variant, config, indices, target))
                        row.update(common.time_calls(lambda s=step, v=vals: s(weight, v, bias),
                                                     warmup=2, iters=args.iters))
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(row, flush=True)
                rows.append(row)
    rows.sort(key=lambda r: (r["k"], r["distribution"], r.get("median_ms", 1e9)))
    print(common.markdown_table(rows, [
        ("k", "K", "d"), ("distribution", "indices", "s"), ("variant", "variant", "s"),
        ("config", "config", "s"), ("median_ms", "median ms", ".3f"), ("error", "error", "s")]))
    atomic_write_json(args.out, {"dtype": args.dtype, "rows": rows, **common.device_info()})


if __name__ == "__main__":
    main()
