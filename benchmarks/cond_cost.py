"""What a ``lax.cond`` costs a compiled step on this device, with no work in its branch.

A step of the trainer's shape (an encoder-sized matmul [B, D] x [D, F] and its update) with
n idle two-way conds after it (each predicate computed on the device from the step's data,
false; the taken branch returns its operand), timed as the trainer runs: ``--chain``
steps dispatched back to back, each feeding the next, one sync at the end. The difference
per cond from the n = 0 step is the cond's cost (a host round trip for its predicate where
XLA runs conds on the host). Prints a table and writes JSON.
Usage: python benchmarks/cond_cost.py [--batch 4096 --d-model 2304 --n-latents 65536]
       [--conds 0,1,2,4,8,16] [--chain 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json


def step(n_conds: int, weight: jax.Array, x: jax.Array) -> jax.Array:
    """weight [F, D] float32 after one matmul-shaped update from x [B, D] float32, then
    ``n_conds`` idle conds on values of the update."""
    pre = x @ weight.T  # [B, F]
    grad = pre.T @ x * 1e-9  # [F, D]
    weight = weight - grad
    for i in range(n_conds):
        weight = jax.lax.cond(weight[i, 0] > 1e30, lambda w: w * 0.5, lambda w: w, weight)
    return weight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--conds", default="0,1,2,4,8,16")
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="cond_cost.json")
    args = parser.parse_args(argv)
    b, d, f = args.batch, args.d_model, args.n_latents
    x = jax.random.normal(jax.random.key(0), (b, d), jnp.float32)
    weight0 = jax.random.normal(jax.random.key(1), (f, d), jnp.float32) * 0.01
    rows = []
    print(f"{jax.devices()[0].device_kind}: B={b} D={d} F={f}, {args.chain} steps a timing")
    print(f"{'conds':>6} {'ms/step':>9} {'ms/cond':>9}")
    base = None
    for n in (int(c) for c in args.conds.split(",")):
        fn = jax.jit(functools.partial(step, n), donate_argnums=0)

        def chain(fn=fn):
            weight = weight0.copy()
            for _ in range(args.chain):
                weight = fn(weight, x)
            return weight

        timing = common.time_calls(chain, warmup=1, iters=args.iters)
        per_step = timing["median_ms"] / args.chain
        base = per_step if n == 0 else base
        per_cond = (per_step - base) / n if n and base is not None else None
        rows.append({"conds": n, "ms_per_step": per_step, "ms_per_cond": per_cond, **timing})
        print(f"{n:>6} {per_step:>9.3f} "
              f"{'' if per_cond is None else f'{per_cond:9.4f}'}", flush=True)
    atomic_write_json(args.out, {"device": common.device_info(), "batch": b, "d_model": d,
                                 "n_latents": f, "chain": args.chain, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
