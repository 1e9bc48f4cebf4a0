"""Where the trainer's step spends its time: a jax.profiler trace summarised per piece.

Builds the step ``hsae train`` takes (``make_train_step`` on one device, optionally with a
share of the latents dead so that AuxK runs), warms it up, traces ``--steps`` calls with
``jax.profiler`` and adds up the device time of every executed HLO op (on a GPU: its
kernels; on a CPU: its thunks). Each op is put in a piece by the named scopes its HLO
metadata carries (``op_name``, from the step's ``jax.named_scope``s): encoder matmul,
top-k, encoder backward, decoder loss, AuxK, optimizer tail, counters, other (glue
outside any scope). Prints the pieces per step beside the step's wall time, and the ops
that took longest; writes JSON (``--out``) and keeps the trace (``--trace-dir``, for
Perfetto / TensorBoard).

H200 (``bash benchmarks/h200.sh profile``)::

    python benchmarks/profile_step.py --k 128 --out profile_k128.json

CPU smoke run (tests/test_bench.py): ``--tiny``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# XLA's command buffers (CUDA graphs) run many ops as one, which the trace shows as one
# op without scopes ("command_buffer_N"): off, so every op is put in its piece (the step
# then pays its kernel launches one by one: the wall time can be a little longer)
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hsae_jax.bench import common  # noqa: E402
from hsae_jax.bench.step import trainer_step  # noqa: E402
from hsae_jax.io_utils import atomic_write_json  # noqa: E402
from hsae_jax.parallel import MeshShape  # noqa: E402
from hsae_jax.parallel.plan import LOW_MEMORY  # noqa: E402

# (piece, pattern on the op's op_name), first match wins
PIECES = (
    ("gradient mean over data", r"\bdata_mean\b"),
    ("AuxK", r"\bauxk\b"),
    ("optimizer tail", r"\boptimizer\b"),
    ("counters", r"\bcounters\b"),
    ("decoder loss", r"\bdecoder_loss\b"),
    ("top-k", r"\bencoder\b.*\btop_k\b"),
    ("encoder backward", r"transpose\(jvp\(encoder\)\)"),
    ("encoder matmul", r"\bencoder\b"),
)
OTHER = "other (glue)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=65536)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dead", type=float, default=0.0,
                   help="share of the latents dead in every traced step (AuxK runs)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mesh", default=None,
                   help="e.g. data=2,model=1: the step on this mesh (this process's first "
                   "devices), --batch rows per data shard; device times are per device (the "
                   "mean over the mesh); default one device")
    p.add_argument("--update-blocks", type=int, default=None,
                   help="the update in this many blocks of latents (hsae train's flag; 0: "
                   "the whole update, also with --low-memory)")
    p.add_argument("--low-memory", action="store_true",
                   help="hsae plan's low-memory options (bfloat16 parameters and moments, "
                   "...), --update-blocks among them unless given")
    p.add_argument("--steps", type=int, default=10, help="steps traced")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="longest ops listed")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes")
    p.add_argument("--trace-dir", default=None, help="where the trace stays (default: a "
                   "temporary folder, removed)")
    p.add_argument("--out", default="profile_step.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.n_latents, args.d_model, args.k = 64, 256, 32, 8
    return args


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its metadata op_name (the JAX name stack), for every
    instruction of the compiled module that has one."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"", line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def piece_of(op_name: str | None) -> str:
    for piece, pattern in PIECES:
        if op_name and re.search(pattern, op_name):
            return piece
    return OTHER


def op_times(trace_dir: str, module: str) -> tuple[dict[str, float], dict[str, int],
                                                  dict[str, float]]:
    """(total microseconds, event count) per HLO op of ``module`` in the Perfetto trace
    under ``trace_dir``: device events where the trace has a device, else host ones; and
    the microseconds of the device events that name no HLO op of ``module``, by event
    name (kernels the attribution misses: what the pieces leave out)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})
           and e["args"].get("hlo_module", module) == module
           and (not devices or e["pid"] in devices)]
    key = lambda e: e["args"]["hlo_op"]  # noqa: E731
    if not ops and devices:  # device events without HLO names: by kernel name, unscoped
        print("warning: the trace's device events name no HLO op; kernels listed by name")
        ops = [e for e in events if e.get("ph") == "X" and e["pid"] in devices]
        key = lambda e: e["name"]  # noqa: E731
    total, count = collections.defaultdict(float), collections.Counter()
    for e in _leaves(ops):
        total[key(e)] += float(e.get("dur", 0.0))
        count[key(e)] += 1
    counted = {id(e) for e in ops}
    missed = collections.defaultdict(float)
    for e in _leaves([e for e in events if e.get("ph") == "X" and e["pid"] in devices
                      and id(e) not in counted]):
        missed[e["name"]] += float(e.get("dur", 0.0))
    return dict(total), dict(count), dict(missed)


def _leaves(events: list[dict]) -> list[dict]:
    """The events that hold no other event of their thread (a CPU's while / conditional
    thunk spans the ops of its body, which are events too: count those once)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    leaves = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        for i, e in enumerate(thread):
            end = float(e["ts"]) + float(e.get("dur", 0.0))
            following = thread[i + 1] if i + 1 < len(thread) else None
            if following is None or float(following["ts"]) >= end:
                leaves.append(e)
    return leaves


def build(args):
    """(trainer step, its batch x, rows a step, devices, the ``hsae train`` settings beyond
    the shapes) for the parsed ``args``."""
    shards, model = (MeshShape.parse(args.mesh).resolve(jax.device_count()) if args.mesh
                     else (1, 1))
    batch = args.batch * shards  # rows in all
    settings = dict(LOW_MEMORY) if args.low_memory else {}
    if args.low_memory:
        settings.pop("compute_dtype")
        args.compute_dtype = "bfloat16"
    if args.update_blocks is not None:
        settings["update_blocks"] = args.update_blocks or None
    trainer = trainer_step(batch, args.n_latents, args.d_model, args.k,
                           args.compute_dtype, args.dead, args.backend, args.mesh, **settings)
    x = trainer.put(jax.random.normal(jax.random.key(2), (batch, args.d_model), jnp.float32))
    return trainer, x, batch, shards * model, settings


def describe(args, trainer, batch: int) -> str:
    """One line naming the step :func:`build` made."""
    return (f"trainer step: B={args.batch} F={args.n_latents} D={args.d_model} K={args.k} "
            f"{args.compute_dtype}, {args.dead:.0%} dead, backend "
            f"{trainer.tc.kernels().backend}, mesh {args.mesh or 'one device'} "
            f"({batch} rows a step)")


def workload(args, batch: int, devices: int, settings: dict) -> dict:
    """The JSON "workload" of the step :func:`build` made."""
    return dict(batch=args.batch, n_latents=args.n_latents, d_model=args.d_model, k=args.k,
                compute_dtype=args.compute_dtype, dead=args.dead, mesh=args.mesh,
                devices=devices, rows_per_step=batch, settings=settings)


def main(argv=None) -> int:
    args = parse_args(argv)
    trainer, x, batch, devices, settings = build(args)
    compiled = trainer.step.lower(*trainer.state, x).compile()
    hlo = compiled.as_text()
    analysis = compiled.memory_analysis()
    xla_gb = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 1e9
    module = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)

    def run():
        return trainer.run(x)

    timing = common.time_calls(run, warmup=args.warmup, iters=args.steps)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="hsae-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(args.steps):
            out = run()
        jax.block_until_ready(out)
        traced_ms = (time.perf_counter() - start) * 1e3 / args.steps
    totals, counts, missed = op_times(trace_dir, module)
    if not args.trace_dir:
        import shutil

        shutil.rmtree(trace_dir, ignore_errors=True)
    scopes = op_scopes(hlo)
    pieces = collections.defaultdict(float)
    per_step = 1e3 * args.steps * devices  # microseconds -> ms a step, per device
    for op, us in totals.items():
        pieces[piece_of(scopes.get(op))] += us / per_step
    device_ms = sum(pieces.values())
    rows = [{"piece": p, "ms_per_step": ms, "share": ms / device_ms if device_ms else 0.0}
            for p, ms in sorted(pieces.items(), key=lambda kv: -kv[1])]
    ops = [{"op": op, "piece": piece_of(scopes.get(op)), "ms_per_step": us / per_step,
            "calls_per_step": counts[op] / args.steps / devices, "op_name": scopes.get(op, "")}
           for op, us in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]]
    print(f"{describe(args, trainer, batch)}; {args.steps} steps traced; device times per "
          "device")
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9
             for d in jax.local_devices()[:devices]]
    print(f"step wall time {timing['median_ms']:.3f} ms (median of {args.steps}); traced "
          f"{traced_ms:.3f} ms a step; device busy {device_ms:.3f} ms a step")
    print(f"memory per device: XLA's plan {xla_gb:.2f} GB (arguments + temporaries); peak in "
          f"use {', '.join(f'{p:.2f}' for p in peaks)} GB\n")
    print(common.markdown_table(rows, [("piece", "piece", "s"),
                                       ("ms_per_step", "ms / step", ".3f"),
                                       ("share", "share of device time", ".1%")]))
    print()
    print(common.markdown_table(ops, [("op", "op", "s"), ("piece", "piece", "s"),
                                      ("ms_per_step", "ms / step", ".3f"),
                                      ("calls_per_step", "calls / step", ".1f"),
                                      ("op_name", "op_name", "s")]))
    missed_rows = [{"event": name[:80], "ms_per_step": us / per_step}
                   for name, us in sorted(missed.items(), key=lambda kv: -kv[1])[:args.top]]
    if missed_rows:
        print(f"\ndevice events the pieces leave out (no HLO op of this step): "
              f"{sum(missed.values()) / per_step:.3f} ms a step")
        print(common.markdown_table(missed_rows, [("event", "event", "s"),
                                                  ("ms_per_step", "ms / step", ".3f")]))
    atomic_write_json(args.out, {
        "benchmark": "profile_step", "device": common.device_info(),
        "workload": workload(args, batch, devices, settings),
        "step_ms": timing["median_ms"], "traced_ms": traced_ms, "device_ms": device_ms,
        "xla_memory_gb": xla_gb, "peak_memory_gb": peaks,
        "pieces": rows, "ops": ops, "unattributed": missed_rows})
    print(f"\nwrote {args.out}")
    return 0 if totals else 1


if __name__ == "__main__":
    sys.exit(main())
