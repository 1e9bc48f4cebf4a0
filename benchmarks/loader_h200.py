"""Where a run from an activation file loses time: the data path and the step, apart and
together (issue 11's file runs at 0.65-0.83 of the synthetic run's tokens/s).

Rows of the synthetic generator are written once as float32 and float16 ``.npy`` files;
then, each with the trainer's own pieces (``TrainConfig``, ``init_state``,
``make_train_step``, ``Prefetcher``) and without its records, evaluation or saving:

- ``step``: the step alone on one fixed device batch, float32 and float16 input (does a
  float16 input cost the step anything?);
- ``put``: the copy of one host batch to the device alone (no read), from the host buffer
  as it is and staged through pinned host memory (``put staged``, GPUs only);
- ``loader``: the prefetching loader alone (read, copy to the device, float32 + NaN check),
  for several reading-thread counts, the copy direct and staged;
- ``loop``: step and loader together, as the trainer runs them (the rate to match: the
  ``synthetic`` loop, whose batches are made on the device);
- the loader's pieces, on the same threads, each thread reading into its own buffer as the
  loader does: ``read`` (``host_batch`` alone), ``read + put`` (and the copy to the device,
  waited for), ``read + put staged`` (the copy staged through pinned host memory, as
  ``Layout.put_batch`` does on GPUs), ``read + put registered`` (the thread's buffer pinned
  in place with cudaHostRegister): which of them caps the loader;
- ``loop`` / ``loop staged`` / ``... lag 2``: step and loader together, the copy direct
  and staged, the NaN / inf check waited for on the reading threads or read two steps later
  (``Prefetcher(check_lag=2)``, what the trainer does).

Each row: ms per batch (median of ``--repeats`` timings of ``--steps`` batches) and
tokens/s. Prints a markdown table, writes JSON (``--out``).

GPU:  python3 benchmarks/loader_h200.py --out loader.json   (about 2-3 minutes)
CPU:  python benchmarks/loader_h200.py --tiny --out /tmp/loader.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import statistics
import threading
import time

import jax
import numpy as np

from hsae_jax.bench import common
from hsae_jax.data import Prefetcher
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.parallel import MeshShape, make_layout
from hsae_jax.parallel.state import init_state
from hsae_jax.train import TrainConfig
from hsae_jax.train.step import make_optimizer, make_train_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=65536)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--steps", type=int, default=40, help="batches per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="1,2,4,8", help="reading threads to try")
    p.add_argument("--backend", default="auto")
    p.add_argument("--work-dir", default="/tmp/hsae-loader")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes")
    p.add_argument("--out", default="loader.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.n_latents, args.d_model, args.k = 64, 256, 32, 8
        args.rows, args.steps, args.repeats, args.workers = 2048, 6, 2, "1,2"
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def settings(args, data=None) -> TrainConfig:
    return TrainConfig.from_flat(d_model=args.d_model, n_latents=args.n_latents, k=args.k,
                                 batch_size=args.batch, steps=1_000_000, data=data,
                                 eval_fraction=0.01 if data else 0.0, backend=args.backend,
                                 synthetic_features=max(64, args.d_model * 4),
                                 synthetic_active=max(4.0, args.k * 0.75))


def write_files(args) -> dict[str, str]:
    os.makedirs(args.work_dir, exist_ok=True)
    paths = {dt: os.path.join(args.work_dir, f"acts-{args.rows}-{args.d_model}-{dt}.npy")
             for dt in ("float32", "float16")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    source = settings(args).open_source()
    files = {dt: np.lib.format.open_memmap(p + ".tmp.npy", mode="w+", dtype=dt,
                                           shape=(args.rows, args.d_model))
             for dt, p in paths.items()}
    for i, start in enumerate(range(0, args.rows, args.batch)):
        rows = np.asarray(source.batch(100_000 + i))[: args.rows - start]
        for f in files.values():
            f[start:start + len(rows)] = rows
    for dt, f in files.items():
        f.flush()
        os.replace(paths[dt] + ".tmp.npy", paths[dt])
    return paths


def timed(run, repeats: int, steps: int, batch: int) -> dict:
    """ms per batch (median over repeats; one warm-up) and tokens/s of ``run(first_step)``."""
    run(0)
    samples = []
    for r in range(repeats):
        start = time.perf_counter()
        run((r + 1) * steps)
        samples.append((time.perf_counter() - start) * 1e3 / steps)
    ms = statistics.median(samples)
    return {"ms_per_batch": ms, "tokens_per_s": batch / ms * 1e3}


def _cuda_host_register():
    """cudaHostRegister from the CUDA runtime already in the process (or one of the nvidia
    packages'), or None: pins an existing host buffer in place."""
    import ctypes
    import glob
    import sys

    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    names += sorted({f for p in sys.path for f in glob.glob(
        os.path.join(p, "nvidia", "**", "libcudart.so*"), recursive=True)})
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        register = lib.cudaHostRegister
        register.restype = ctypes.c_int
        register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        return lambda x: register(x.ctypes.data, x.nbytes, 1)  # cudaHostRegisterPortable
    return None


def pieces(layout, batch: int) -> dict:
    """What each piece's thread does with the rows it read: nothing, the copy to the device
    (waited for) from the host buffer as it is, through pinned host memory
    (``put_batch(staged=True)``, where the platform has it), and from a host buffer pinned
    in place with cudaHostRegister (where the CUDA runtime is found)."""
    done = {"read": None,
            "read + put": lambda x: layout.put_batch(x, batch, staged=False).block_until_ready()}
    if layout.batch_sharding.mesh.devices.flat[0].platform == "cpu":
        return done
    done["read + put staged"] = lambda x: layout.put_batch(
        x, batch, staged=True).block_until_ready()
    register = _cuda_host_register()
    if register is not None:
        registered = set()

        def put_registered(x):
            if x.ctypes.data not in registered:  # each thread's buffer, once
                code = register(x)
                if code != 0:
                    raise RuntimeError(f"cudaHostRegister failed: {code}")
                registered.add(x.ctypes.data)
            layout.put_batch(x, batch, staged=False).block_until_ready()

        done["read + put registered"] = put_registered
    return done


def put_on_threads(layout, rows: np.ndarray, n: int, workers: int, staged: bool,
                   first: int) -> None:
    """``n`` copies of ``rows`` (one host buffer per thread) to the device, waited for."""
    local = threading.local()

    def one(_):
        if getattr(local, "buffer", None) is None:
            local.buffer = rows.copy()
        layout.put_batch(local.buffer, rows.shape[0], staged=staged).block_until_ready()

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(first, first + n)))


def read_on_threads(source, n: int, workers: int, move, first: int) -> None:
    """Steps ``first .. first + n`` read by ``workers`` threads, each into its own host
    buffer (as the loader reads), then ``move``d (None: nothing)."""
    local = threading.local()

    def one(step):
        buffer = getattr(local, "buffer", None)
        local.buffer = x = source.host_batch(step, out=buffer)
        if move is not None:
            move(x)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(first, first + n)))


class Trainer:
    """The trainer's step on its state, for ``tc`` (one device)."""

    def __init__(self, tc: TrainConfig, sample):
        self.layout = make_layout(MeshShape.parse(tc.mesh), 1)
        cfg = dataclasses.replace(tc.sae, d_model=sample.shape[1])
        tx = make_optimizer(tc, self.layout)
        self.state = init_state(self.layout, cfg, tx, tc.seed, sample)
        self.step = make_train_step(cfg, tx, self.layout, tc.kernels())

    def __call__(self, x):
        s = self.state
        *values, metrics = self.step(s["params"], s["stats"], s["opt_state"], x)
        self.state = dict(zip(("params", "stats", "opt_state"), values, strict=True))
        return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = write_files(args)
    rows = []
    n = args.steps
    synthetic = settings(args).open_source()
    trainer = Trainer(settings(args), np.asarray(synthetic.batch(0)))

    for dtype in ("float32", "float16"):  # the step alone on one device batch
        x = jax.device_put(np.asarray(synthetic.batch(1)).astype(dtype))

        def steps_only(first, x=x):
            for _ in range(n):
                metrics = trainer(x)
            jax.block_until_ready(metrics)

        rows.append({"what": "step", "data": f"fixed device batch, {dtype}",
                     **timed(steps_only, args.repeats, n, args.batch)})

    for dtype, path in paths.items():  # the loader alone
        source = settings(args, path).open_source()
        for workers in args.workers:
            for staged in (False, True):
                put_as = functools.partial(trainer.layout.put_batch, batch_size=args.batch,
                                           staged=staged)

                def load_only(first, source=source, workers=workers, put_as=put_as):
                    with Prefetcher(source, range(first, first + n), put_as,
                                    depth=max(4, workers), workers=workers) as batches:
                        for _, x in batches:
                            last = x
                    jax.block_until_ready(last)

                rows.append({"what": "loader" + (" staged" if staged else ""),
                             "data": f".npy {dtype}", "workers": workers,
                             **timed(load_only, args.repeats, n, args.batch)})

    on_gpu = trainer.layout.batch_sharding.mesh.devices.flat[0].platform != "cpu"
    for dtype in paths:  # the copy to the device alone, from a buffer read once
        rows_host = np.asarray(synthetic.batch(2)).astype(dtype)
        for workers in args.workers:
            for staged in ((False, True) if on_gpu else (False,)):
                rows.append({"what": "put staged" if staged else "put", "data": dtype,
                             "workers": workers, **timed(functools.partial(
                                 put_on_threads, trainer.layout, rows_host, n, workers, staged),
                                 args.repeats, n, args.batch)})

    for dtype, path in paths.items():  # the loader's pieces
        source = settings(args, path).open_source()
        for workers in args.workers:
            for what, move in pieces(trainer.layout, args.batch).items():
                rows.append({"what": what, "data": f".npy {dtype}", "workers": workers,
                             **timed(functools.partial(read_on_threads, source, n, workers,
                                                       move), args.repeats, n, args.batch)})

    sources = {"synthetic": synthetic,
               **{f".npy {dt}": settings(args, p).open_source() for dt, p in paths.items()}}
    # the trainer's loop, without records: the copy direct or staged, the NaN / inf check
    # waited for by the reading threads (lag 0) or read by the loop two steps later
    variants = [(None, 0)]
    if on_gpu:
        variants = [(False, 0), (True, 0), (False, 2), (True, 2)]
    else:
        variants.append((None, 2))
    for name, source in sources.items():
        for workers in ([None] if name == "synthetic" else args.workers):
            for staged, lag in ([(None, 0)] if name == "synthetic" else variants):
                put_as = functools.partial(trainer.layout.put_batch, batch_size=args.batch,
                                           staged=staged)

                def loop(first, source=source, workers=workers, put_as=put_as, lag=lag):
                    with Prefetcher(source, range(first, first + n), put_as,
                                    depth=max(4, workers or 4), workers=workers,
                                    check_lag=lag) as batches:
                        for _, x in batches:
                            metrics = trainer(x)
                    jax.block_until_ready(metrics)

                what = "loop" + (" staged" if staged else "") + (f" lag {lag}" if lag else "")
                rows.append({"what": what, "data": name, "workers": workers,
                             **timed(loop, args.repeats, n, args.batch)})

    base = next(r["tokens_per_s"] for r in rows if r["what"] == "loop"
                and r["data"] == "synthetic")
    for r in rows:
        r["vs_synthetic_loop"] = r["tokens_per_s"] / base
    print(f"B={args.batch} F={args.n_latents} D={args.d_model} K={args.k}, {n} batches per "
          f"timing, median of {args.repeats}, {os.cpu_count()} CPUs")
    print(common.markdown_table(rows, [
        ("what", "what", "s"), ("data", "data", "s"), ("workers", "threads", "d"),
        ("ms_per_batch", "ms / batch", ".2f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("vs_synthetic_loop", "vs synthetic loop", ".2f")]))
    atomic_write_json(args.out, {"benchmark": "loader", "device": common.device_info(),
                                 "settings": {k: v for k, v in vars(args).items()},
                                 "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
