"""One-GPU figures for the sharded step (issue 15), on the H200 or tiny on a CPU.

``--mode step``: the sharded step on a one-device mesh against the replicated step
(``make_replicated_step``, what ``hsae train`` runs there until this is measured), same
state and batch, timed interleaved (median of ``--iters`` calls each) with no latent dead
and at each dead fraction of ``--dead`` (default 0, 0.1 and 1: AuxK in every call); also
checks that both give the same loss and that the compiled one-device program holds no
collective. Goal: within 5%.

``--mode largest``: the largest F that trains on one device at (D, K, B) with the
default settings (float32, AuxK on): a binary search over powers of two and their
midpoints, each attempt in its own process (an out-of-memory failure ends only that
process). An attempt makes the state on the device, runs 2 steps and 1 step with every
latent dead (AuxK's largest bucket), and reports XLA's memory analysis and the device's
peak bytes. ``--max-gb`` fails attempts whose compiled memory exceeds it (how the CPU test
fakes a device limit).

``--mode all`` (default): both. Prints markdown tables; writes JSON (``--out``).

GPU (about 3 minutes):  python3 benchmarks/shard_h200.py --backend triton --out shard.json
CPU smoke test:         python benchmarks/shard_h200.py --tiny --out /tmp/shard.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97",
       "PYTHONUNBUFFERED": "1"}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hsae_jax.bench import common  # noqa: E402
from hsae_jax.io_utils import atomic_write_json  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


def _config(args, n_latents: int):
    from hsae_jax.train import TrainConfig

    return TrainConfig.from_flat(d_model=args.d_model, n_latents=n_latents, k=args.k,
                                 batch_size=args.batch, steps=10_000, backend=args.backend)


def _with_dead(stats, fraction: float, cfg):
    """``stats`` with the first ``fraction`` of a fixed random order of the latents dead."""
    f = cfg.n_latents
    dead = np.random.default_rng(2).permutation(f)[:int(round(fraction * f))]
    since = np.zeros(f, np.int32)
    since[dead] = cfg.dead_tokens
    return {**stats, "tokens_since_fired": jax.device_put(
        since, stats["tokens_since_fired"].sharding)}


def time_steps(args) -> dict:
    """The sharded step on mesh (1, 1) against the replicated step, interleaved, at each
    dead fraction of ``--dead`` (with latents dead, both steps get the same counters in
    every call: AuxK runs in every call)."""
    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.state import init_state
    from hsae_jax.train.step import (
        make_mesh,
        make_optimizer,
        make_replicated_step,
        make_train_step,
    )

    tc = _config(args, args.n_latents)
    kernels = tc.kernels()
    layout = make_layout("data=1,model=1", 1)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.d_model), jnp.float32)
    steps = {}
    for name in ("sharded", "replicated"):
        tx = make_optimizer(tc, layout) if name == "sharded" else make_optimizer(tc)
        steps[name] = (tx, make_train_step(tc.sae, tx, layout, kernels) if name == "sharded"
                       else make_replicated_step(tc.sae, tx, make_mesh(1), kernels))
    rows, ratios, same, hlo = [], {}, True, None
    for fraction in args.dead:
        runs = {}
        for name, (tx, step) in steps.items():
            state = init_state(layout, tc.sae, tx, 0, np.asarray(x[:256]))
            stats = _with_dead(state["stats"], fraction, tc.sae)
            holder = [state["params"], stats, state["opt_state"]]

            def call(step=step, holder=holder, stats=stats, fixed=fraction > 0):
                given = jax.tree.map(jnp.copy, stats) if fixed else holder[1]
                holder[0], carried, holder[2], metrics = step(holder[0], given, holder[2], x)
                if not fixed:
                    holder[1] = carried
                return metrics["loss"]

            runs[name] = (call, step, holder)
        samples = {name: [] for name in runs}
        losses = {name: float(common.block(call())) for name, (call, _, _) in runs.items()}
        for _ in range(args.warmup):
            for call, _, _ in runs.values():
                common.block(call())
        for _ in range(args.iters):  # interleaved: clock and thermal drift hit both alike
            for name, (call, _, _) in runs.items():
                start = time.perf_counter()
                common.block(call())
                samples[name].append((time.perf_counter() - start) * 1e3)
        if hlo is None:
            hlo = steps["sharded"][1].lower(*runs["sharded"][2], x).compile().as_text()
        for name in runs:
            s = sorted(samples[name])
            rows.append({"dead_fraction": fraction, "step": name, "median_ms": s[len(s) // 2],
                         "p10_ms": s[len(s) // 10], "p90_ms": s[(9 * len(s)) // 10],
                         "first_loss": losses[name],
                         "tokens_per_s": args.batch / (s[len(s) // 2] * 1e-3)})
        ratios[fraction] = rows[-2]["median_ms"] / rows[-1]["median_ms"]
        same &= abs(losses["sharded"] - losses["replicated"]) <= 1e-5 * max(
            1.0, abs(losses["replicated"]))
    return {"rows": rows, "sharded_over_replicated": ratios[args.dead[0]],
            "ratio_by_dead_fraction": {str(k): v for k, v in ratios.items()},
            "collectives_in_one_device_program": [c for c in COLLECTIVES if c in hlo],
            "same_first_loss": same}


def attempt(args) -> dict:
    """One F in this process: compile, make the state, train 3 steps (the last with every
    latent dead). Raises on failure (out of memory)."""
    from hsae_jax.parallel import make_layout
    from hsae_jax.parallel.state import abstract_state, init_state
    from hsae_jax.train.step import make_optimizer, make_train_step

    tc = _config(args, args.n_latents)
    layout = make_layout("data=1,model=1", 1)
    tx = make_optimizer(tc, layout)
    step = make_train_step(tc.sae, tx, layout, tc.kernels())
    shapes = abstract_state(layout, tc.sae, tx)
    x_shape = jax.ShapeDtypeStruct((args.batch, args.d_model), jnp.float32,
                                   sharding=layout.batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(shapes["params"], shapes["stats"], shapes["opt_state"],
                          x_shape).compile()
    memory = compiled.memory_analysis()
    out = {"n_latents": args.n_latents, "compile_s": time.perf_counter() - start,
           "xla_argument_gb": memory.argument_size_in_bytes / 1e9,
           "xla_temp_gb": memory.temp_size_in_bytes / 1e9}
    out["xla_total_gb"] = out["xla_argument_gb"] + out["xla_temp_gb"]
    if args.max_gb and out["xla_total_gb"] > args.max_gb:
        raise MemoryError(f"compiled step needs {out['xla_total_gb']:.2f} GB > --max-gb")
    x = jax.random.normal(jax.random.key(1), (args.batch, args.d_model), jnp.float32)
    state = init_state(layout, tc.sae, tx, 0, np.asarray(x[:256]))
    params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
    times = []
    for i in range(3):
        if i == 2:  # every latent dead: AuxK's largest bucket runs
            stats = {**stats, "tokens_since_fired": jnp.full_like(
                stats["tokens_since_fired"], tc.sae.dead_tokens)}
        t = time.perf_counter()
        params, stats, opt_state, metrics = step(params, stats, opt_state, x)
        metrics = jax.device_get(metrics)
        times.append((time.perf_counter() - t) * 1e3)
    if not np.isfinite(metrics["loss"]) or metrics["skipped_steps"]:
        raise FloatingPointError(f"non-finite step: {metrics}")
    out["step_ms"], out["all_dead_step_ms"] = times[1], times[2]
    out["auxk_loss_all_dead"] = float(metrics["auxk_loss"])
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    out["peak_gb"] = None if peak is None else peak / 1e9
    return out


def candidates(low: int, high: int) -> list[int]:
    """Powers of two and their midpoints (1.5 x) in [low, high]."""
    out, f = [], 1
    while f <= high:
        out += [f, 3 * f // 2] if f >= 2 else [f]
        f *= 2
    return sorted(c for c in set(out) if low <= c <= high)


def _run_attempt(args, n_latents: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", "attempt", "--n-latents",
           str(n_latents), "--d-model", str(args.d_model), "--k", str(args.k), "--batch",
           str(args.batch), "--backend", args.backend, "--max-gb", str(args.max_gb or 0)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.attempt_timeout,
                              env={**os.environ, **ENV})
    except subprocess.TimeoutExpired:
        return {"n_latents": n_latents, "ok": False, "error": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ATTEMPT ")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1][len("ATTEMPT "):]), "ok": True,
                "wall_s": time.perf_counter() - start}
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    error = next((line for line in reversed(tail) if "RESOURCE_EXHAUSTED" in line
                  or "Error" in line), tail[-1] if tail else f"exit {proc.returncode}")
    return {"n_latents": n_latents, "ok": False, "error": error[-300:],
            "wall_s": time.perf_counter() - start}


def largest(args, log=print) -> dict:
    """Binary search over :func:`candidates`: the largest F whose attempt succeeds."""
    grid = candidates(args.low, args.high)
    lo, hi = -1, len(grid)  # grid[lo] trains (or none), grid[hi] does not (or beyond)
    attempts = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = _run_attempt(args, grid[mid])
        attempts.append(result)
        log(f"  F={grid[mid]}: " + ("trains" if result["ok"] else f"fails ({result['error']})")
            + (f", step {result['step_ms']:.1f} ms, XLA {result['xla_total_gb']:.1f} GB"
               if result["ok"] else ""))
        if result["ok"]:
            lo = mid
        else:
            hi = mid
    return {"largest_n_latents": grid[lo] if lo >= 0 else None,
            "first_failing": grid[hi] if hi < len(grid) else None,
            "attempts": attempts, "grid": grid}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("all", "step", "largest", "attempt"), default="all")
    p.add_argument("--tiny", action="store_true", help="CPU-sized run (xla backend)")
    p.add_argument("--backend", default=None, help="default: triton (tiny: xla)")
    p.add_argument("--batch", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-latents", type=int, help="--mode step / attempt: F")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dead", default="0,0.1,1",
                   help="--mode step: dead fractions to time at (comma-separated)")
    p.add_argument("--low", type=int, help="smallest F the search tries")
    p.add_argument("--high", type=int, help="largest F the search tries")
    p.add_argument("--max-gb", type=float, default=0.0,
                   help="fail attempts whose compiled memory exceeds this (0: off)")
    p.add_argument("--attempt-timeout", type=int, default=240)
    p.add_argument("--out", default="shard_h200.json")
    args = p.parse_args(argv)
    args.dead = [float(f) for f in str(args.dead).split(",")]
    big = dict(batch=4096, d_model=2304, n_latents=65536, iters=20, low=2**18, high=2**21,
               backend="triton")
    tiny = dict(batch=64, d_model=32, n_latents=512, iters=3, low=2**9, high=2**13,
                backend="xla", k=8)
    for key, value in (tiny if args.tiny else big).items():
        if getattr(args, key) is None or (key == "k" and args.tiny and args.k == 64):
            setattr(args, key, value)
    if args.mode == "attempt":
        print("ATTEMPT " + json.dumps(attempt(args)), flush=True)
        return 0
    payload = {"benchmark": "shard_h200", "device": common.device_info(),
               "settings": {k: getattr(args, k) for k in ("batch", "d_model", "k", "backend",
                                                          "n_latents", "iters")}}
    if args.mode in ("all", "step"):
        print(f"step: B={args.batch} F={args.n_latents} D={args.d_model} K={args.k}, "
              f"backend {args.backend}, {args.iters} interleaved calls each, dead "
              f"fractions {args.dead}")
        payload["step"] = time_steps(args)
        s = payload["step"]
        print(common.markdown_table(s["rows"], [
            ("dead_fraction", "dead", "g"), ("step", "step", "s"),
            ("median_ms", "median ms", ".2f"), ("p10_ms", "p10", ".2f"),
            ("p90_ms", "p90", ".2f"), ("tokens_per_s", "tokens/s", ",.0f")]))
        ratios = ", ".join(f"{v:.3f} ({k} dead)" for k, v in s["ratio_by_dead_fraction"].items())
        print(f"sharded / replicated = {ratios}; same first loss: "
              f"{s['same_first_loss']}; collectives on one device: "
              f"{s['collectives_in_one_device_program'] or 'none'}")
    if args.mode in ("all", "largest"):
        print(f"largest F on one device: D={args.d_model} K={args.k} B={args.batch}, "
              f"F in [{args.low}, {args.high}]")
        payload["largest"] = found = largest(args)
        print(common.markdown_table(found["attempts"], [
            ("n_latents", "F", "d"), ("ok", "trains", ""), ("step_ms", "step ms", ".1f"),
            ("all_dead_step_ms", "all-dead step ms", ".1f"), ("xla_total_gb", "XLA GB", ".1f"),
            ("peak_gb", "peak GB", ".1f"), ("error", "error", "s")]))
        print(f"largest F that trains: {found['largest_n_latents']} (first failing: "
              f"{found['first_failing']})")
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
