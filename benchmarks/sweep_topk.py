"""Times the Triton top-k's methods and launch settings on a GPU, against lax.top_k and
torch.topk, on [B, F] rows of encoder pre-activations.

Every timed result is also checked against lax.top_k (indices and values equal).
Prints a markdown table and writes JSON; the winners set the defaults in
hsae_jax/topk/config.py.
Usage: python benchmarks/sweep_topk.py [--ks 32,64,128,256] [--dtypes float32,bfloat16]
       [--batch 4096] [--n-latents 65536] [--out FILE]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax import TopKConfig, top_k
from hsae_jax.bench import common
from hsae_jax.io_utils import atomic_write_json


def candidates():
    yield "threshold", TopKConfig(method="threshold")
    for warps, block in [(8, 4096), (4, 4096), (8, 2048), (4, 1024), (2, 2048)]:
        yield "threshold", TopKConfig(method="threshold", num_warps=warps, block=block)
    yield "threshold", TopKConfig(method="threshold", groups=1)  # groups = next_pow2(k)
    yield "bitonic", TopKConfig(method="bitonic")


def describe(config: TopKConfig | None) -> str:
    if config is None:
        return "-"
    c = config
    if c.method == "bitonic":
        return f"chunk={c.chunk} group={c.group} w={c.num_warps or 'auto'}"
    return f"groups={c.groups} cand={c.candidates} block={c.block} w={c.num_warps or 'auto'}"


def _torch_topk(x, k):
    import torch

    xt = torch.as_tensor(np.asarray(x.astype(jnp.float32)), device="cuda")
    if x.dtype == jnp.bfloat16:
        xt = xt.to(torch.bfloat16)
    return (lambda: torch.topk(xt, k, dim=-1)), (lambda _: torch.cuda.synchronize())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="32,64,128,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default="sweep_topk.json")
    args = parser.parse_args()
    b, f = args.batch, args.n_latents
    pre = jax.random.normal(jax.random.key(0), (b, f)) * 0.05 - 0.01
    read_ms = {}
    rows = []
    for dtype in args.dtypes.split(","):
        x = pre.astype(dtype)
        # the floor: one read of x
        read = jax.jit(lambda a: jnp.max(a, axis=-1))
        read_ms[dtype] = common.time_calls(lambda r=read, a=x: r(a), warmup=2, iters=args.iters)
        for k in (int(s) for s in args.ks.split(",")):
            want_v, want_i = jax.jit(lambda a, k=k: jax.lax.top_k(a, k))(x)
            cases = [("lax.top_k", None)] + list(candidates())
            if not args.no_torch:
                cases.append(("torch.topk", None))
            for name, config in cases:
                row = dict(dtype=dtype, k=k, method=name, config=describe(config))
                try:
                    if name == "torch.topk":
                        fn, sync = _torch_topk(x, k)
                        row.update(common.time_calls(fn, warmup=2, iters=args.iters, sync=sync))
                    else:
                        if config is None:
                            run = jax.jit(lambda a, k=k: jax.lax.top_k(a, k))
                        else:
                            run = jax.jit(lambda a, k=k, c=config: top_k(a, k, backend="triton",
                                                                         config=c))
                        got_v, got_i = run(x)
                        row["exact"] = bool(jnp.array_equal(got_i, want_i)
                                            and jnp.array_equal(got_v, want_v))
                        row.update(common.time_calls(lambda r=run, a=x: r(a), warmup=2,
                                                     iters=args.iters))
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(row, flush=True)
                rows.append(row)
    print("one read of x (jnp.max over rows), ms:",
          {d: round(r["median_ms"], 3) for d, r in read_ms.items()})
    print(common.markdown_table(rows, [
        ("dtype", "dtype", "s"), ("k", "k", "d"), ("method", "method", "s"),
        ("config", "config", "s"), ("median_ms", "median ms", ".3f"), ("exact", "exact", ""),
        ("error", "error", "s")]))
    atomic_write_json(args.out, {"shape": [b, f], "rows": rows, "read_ms": read_ms,
                                 **common.device_info()})


if __name__ == "__main__":
    main()
