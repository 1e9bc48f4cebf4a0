"""Times the fused decoder-loss kernel over block-size configurations (GPU only).

Prints a markdown table per K and writes JSON; the winners feed FusedConfig.resolve.
Usage: python benchmarks/sweep_fused.py [--ks 32,128] [--dtype float32] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import FusedConfig, TritonLossConfig, hierarchical_sae_loss
from hsae_jax.bench import common


def configs_for(k: int):
    k_pow2 = 1 << (k - 1).bit_length()
    for block_d, block_b, warps in itertools.product((16, 32, 64, 128), (1, 2, 4), (4, 8)):
        tile = block_b * k_pow2 * block_d
        if 2048 <= tile <= 16384:
            yield FusedConfig(block_b=block_b, block_d=block_d, d_split=1, num_warps=warps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="32,128")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="sweep_fused.json")
    args = parser.parse_args()
    b, f, d = args.batch, args.n_latents, args.d_model
    key = jax.random.key(0)
    weight = (jax.random.normal(key, (f, d)) / np.sqrt(d)).astype(args.dtype)
    bias = jnp.zeros((d,), args.dtype) + 0.1
    target = jax.random.normal(jax.random.fold_in(key, 1), (b, d)).astype(args.dtype)
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        indices = common.sample_indices(jax.random.fold_in(key, k), b, f, k, "zipf")
        vals = jax.random.uniform(jax.random.fold_in(key, 2), (b, k)).astype(args.dtype)
        for cfg in [FusedConfig(), *configs_for(k)]:
            loss = lambda w, v, bb, c=cfg: hierarchical_sae_loss(  # noqa: E731
                indices, w, v, bb, target, backend="triton",
                config=TritonLossConfig(variant="fused", fused=c))
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            try:
                stats = common.time_calls(lambda s=step: s(weight, vals, bias), warmup=2,
                                          iters=args.iters)
            except Exception as err:  # noqa: BLE001
                stats = {"error": str(err)[:200]}
            resolved = cfg.resolve(b, k, d)
            row = dict(k=k, block_b=resolved.block_b, block_d=resolved.block_d,
                       d_split=resolved.d_split, num_warps=resolved.num_warps,
                       default=cfg == FusedConfig(), **stats)
            print(row, flush=True)
            rows.append(row)
    rows.sort(key=lambda r: (r["k"], r.get("median_ms", 1e9)))
    print(common.markdown_table(rows, [
        ("k", "K", "d"), ("block_b", "BLOCK_B", "d"), ("block_d", "BLOCK_D", "d"),
        ("num_warps", "warps", "d"), ("default", "default", ""),
        ("median_ms", "median ms", ".3f"), ("error", "error", "s")]))
    common.write_json(args.out, {"dtype": args.dtype, "rows": rows, **common.device_info()})


if __name__ == "__main__":
    main()
