"""Multi-GPU runs of the trainer (issue 16) on a machine with several H200s, or tiny on
CPU devices. Every run is ``hsae_jax.train.train`` in its own process (a child of this
script) writing a real run folder; tokens/s come from the run's own ``metrics.jsonl``.

``--mode correctness``: ``--steps`` (20) steps on 1 GPU, on mesh (data=2, model=1) and on
mesh (1, 2), same global batch, deterministic kernels, matmuls in full float32
(``JAX_DEFAULT_MATMUL_PRECISION=highest``: no TF32). Compares every step's metrics and the
final FVU at every k (``--rtol``) and the saved parameters (within one Adam step at the peak
learning rate) with the 1-GPU run.

``--mode scaling``: F=65536 with B=4096 rows per GPU: tokens/s on 1 GPU, on all n of them
data parallel (mesh data=n, B per data shard) and with the dictionary split instead (mesh
model=n, n·B rows), from the embedded synthetic generator (each device makes its own rows)
and from a float16 ``.npy`` file (one reading process for all GPUs).

``--mode sharded``: the largest dictionaries the GPUs hold, every GPU on ``model``:
``--sharded`` lists runs ``F[:low]`` (``low``: the low-memory options,
hsae_jax.parallel.plan.LOW_MEMORY) separated by commas, each with fallbacks after ``|``: a
run that fails (out of memory, or a disk too small for its final checkpoint and model
file: hsae_jax.train.disk) is reported and its fallback is tried. Each trains
``--sharded-steps`` (200) steps and reports tokens/s, each device's peak memory beside
``hsae plan``'s estimate, and the FVU at every k (the run's fvu_vs_k.png is copied beside
the JSON); its checkpoints and model file are then removed (F = 2^22 with the low-memory
options: 116 GB and 77 GB).

``--mode all`` (default): the three. Prints markdown tables; writes JSON (``--out``).

GPU (2 H200s, about 6 minutes):  python3 benchmarks/multi_gpu.py --out multi_gpu.json
CPU smoke test:                  python benchmarks/multi_gpu.py --tiny --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

SHARDED_DEFAULT = "1048576,4194304:low|2097152:low"
METRICS = ("loss", "recon_loss", "auxk_loss", "l0", "dead_fraction", "grad_norm")


def _child(spec_path: str) -> None:
    """One run in this process: train, then the devices' peak memory and the plan."""
    with open(spec_path) as f:
        spec = json.load(f)
    import jax

    from hsae_jax.parallel.plan import PlanSettings, memory_plan
    from hsae_jax.train import TrainConfig, train

    tc = TrainConfig.from_flat(**spec["flat"])
    started = time.perf_counter()
    summary = train(tc, spec["run_dir"], progress=False, log=print)
    wall = time.perf_counter() - started
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    devices = tc.devices or jax.device_count()
    plan = memory_plan(PlanSettings.from_train_config(tc, devices))["total"]
    with open(spec["result"], "w") as f:
        json.dump({"summary": summary, "peak_bytes": peaks, "plan_bytes": plan,
                   "devices": devices, "wall_s": wall}, f)


def run_training(name: str, flat: dict, args, env_extra: dict | None = None) -> dict:
    """``flat`` (TrainConfig settings) trained in a child process; its results."""
    from hsae_jax.bench.train import steady_tokens_per_s

    run_dir = os.path.join(args.work_dir, f"run-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {"flat": flat, "run_dir": run_dir, "result": run_dir + ".result.json"}
    spec_path = run_dir + ".spec.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, **(env_extra or {})}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                          env=env, capture_output=True, text=True)
    row = {"run": name, "wall_s": time.perf_counter() - started, "run_dir": run_dir}
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        # the exception's line (JAX adds a note about its traceback after it)
        named = [x for x in lines if not x.startswith(" ") and ("Error" in x or "error" in x)]
        row["error"] = (named or lines or [f"exit {proc.returncode}"])[-1][:300]
        row["stderr_tail"] = lines[-60:]
        print(f"  {name}: FAILED ({row['error']})", flush=True)
        return row
    with open(spec["result"]) as f:
        result = json.load(f)
    row.update(steady_tokens_per_s(run_dir))
    summary = result["summary"]
    row.update(devices=result["devices"], fvu=summary["fvu"], fvu_per_k=summary["fvu_per_k"],
               plan_gb=result["plan_bytes"] / 1e9,
               peak_gb=[p / 1e9 if p else None for p in result["peak_bytes"]])
    if all(row["peak_gb"]):
        row["max_peak_gb"] = max(row["peak_gb"])
    print(f"  {name}: {row['tokens_per_s']:,.0f} tokens/s, FVU at K {row['fvu']:.4f}, "
          f"{row['wall_s']:.0f} s", flush=True)
    return row


def _base(args, **extra) -> dict:
    flat = dict(d_model=args.d_model, n_latents=args.n_latents, k=args.k,
                batch_size=args.batch, backend=args.backend, eval_batches=1,
                synthetic_features=args.synthetic_features,
                synthetic_active=args.synthetic_active)
    flat.update(extra)
    steps = flat.setdefault("steps", args.steps)
    flat.setdefault("log_every", max(1, min(25, steps // 8)))
    flat.update(eval_every=steps, save_every=steps, warmup_steps=min(100, steps // 4))
    return flat


def _records(run_dir: str) -> tuple[dict[int, dict], list[float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = [r["eval"] for r in records if "eval" in r]
    return steps, evals[-1]["fvu_per_k"]


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def correctness(args) -> dict:
    """1 GPU against meshes (2,1) and (1,2): every step's metrics and the final FVU per k
    within ``--rtol`` (relative), the parameters within one Adam step at the peak rate."""
    from hsae_jax.model import load_model_files
    from hsae_jax.train import TrainConfig

    env = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    flat = _base(args, steps=args.correct_steps, log_every=1, deterministic=True)
    runs = {"1 GPU": dict(devices=1, mesh="data=1,model=1"),
            "mesh (2,1)": dict(mesh="data=2,model=1"), "mesh (1,2)": dict(mesh="data=1,model=2")}
    rows, done = [], {}
    for name, mesh in runs.items():
        row = run_training("correct-" + "".join(c for c in name if c.isalnum()),
                           {**flat, **mesh}, args, env)
        row["mesh"] = name
        rows.append(row)
        if "error" not in row:
            done[name] = row
    if "1 GPU" not in done:
        return {"rows": rows, "same": False}
    # Adam moves every entry by about the learning rate a step, whatever its gradient's
    # size, so a rounding difference in a near-zero gradient entry can move that entry by
    # up to a step: parameters agree when within one step at the peak rate
    peak_lr = TrainConfig.from_flat(**flat).peak_lr()
    ref_steps, ref_fvu = _records(done["1 GPU"]["run_dir"])
    _, ref_params, _ = load_model_files(done["1 GPU"]["run_dir"])
    same = len(done) == len(runs)
    for row in rows:
        if row["run"] == rows[0]["run"] or "error" in row:
            continue
        steps, fvu = _records(row["run_dir"])
        row["metric_rel_diff"] = {
            m: max(abs(steps[s][m] - ref_steps[s][m]) / max(abs(ref_steps[s][m]), 1e-12)
                   for s in ref_steps) for m in METRICS}
        row["fvu_per_k_rel_diff"] = _relative(fvu, ref_fvu)
        _, params, _ = load_model_files(row["run_dir"])
        row["param_rel_diff"] = {n: _relative(params[n], ref_params[n]) for n in ref_params}
        row["param_max_abs_diff"] = {n: float(np.max(np.abs(np.asarray(params[n], np.float64)
                                                            - np.asarray(ref_params[n]))))
                                     for n in ref_params}
        worst_metric = max(row["metric_rel_diff"].values())
        worst_param = max(row["param_max_abs_diff"].values())
        row["worst_metric_rel"], row["worst_param_abs"] = worst_metric, worst_param
        row["same"] = "yes" if (worst_metric <= args.rtol and worst_param <= peak_lr
                                   and row["fvu_per_k_rel_diff"] <= args.rtol) else "no"
        same &= row["same"] == "yes"
    return {"rows": rows, "same": same, "rtol": args.rtol, "param_atol": peak_lr,
            "steps": args.correct_steps}


def _write_float16_file(args) -> str:
    from hsae_jax.bench.train import settle_written_files
    from hsae_jax.train import TrainConfig

    path = os.path.join(args.work_dir, "acts-float16.npy")
    if os.path.exists(path):
        return path
    os.makedirs(args.work_dir, exist_ok=True)
    source = TrainConfig.from_flat(**_base(args)).open_source()
    rows = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float16,
                                     shape=(args.rows, args.d_model))
    step = 10_000  # batches no training run draws
    for start in range(0, args.rows, args.batch):
        chunk = np.asarray(source.batch(step))[: args.rows - start]
        rows[start:start + len(chunk)] = chunk
        step += 1
    rows.flush()
    del rows
    os.replace(path + ".tmp.npy", path)
    settle_written_files()
    return path


def scaling(args) -> dict:
    """Tokens/s on 1 GPU and on n (data parallel, B per data shard)."""
    n = args.gpus
    data = {"synthetic": {}}
    if args.file_runs:
        data["npy-float16"] = dict(data=_write_float16_file(args), eval_fraction=0.01)
    rows = []
    for name, extra in data.items():
        one = run_training(f"scale-{name}-1", _base(args, devices=1, mesh="data=1,model=1",
                                                    **extra), args)
        many = run_training(f"scale-{name}-{n}", _base(args, mesh=f"data={n},model=1",
                                                       batch_size=n * args.batch, **extra),
                            args)
        # the same per-GPU rows with the dictionary split instead of the batch
        split = run_training(f"scale-{name}-model{n}",
                             _base(args, mesh=f"data=1,model={n}", batch_size=n * args.batch,
                                   **extra), args)
        for row, gpus, mesh in ((one, 1, "1 GPU"), (many, n, f"data={n}"),
                                (split, n, f"model={n}")):
            row.update(data=name, gpus=gpus, mesh=mesh)
            if row is not one and one.get("tokens_per_s") and row.get("tokens_per_s"):
                row["speedup"] = row["tokens_per_s"] / one["tokens_per_s"]
        rows += [one, many, split]
    return {"rows": rows, "gpus": n}


def sharded(args) -> dict:
    """The largest dictionaries on every GPU along ``model``: each run of --sharded, or
    its first fallback that trains."""
    rows = []
    for group in args.sharded.split(","):
        for entry in group.split("|"):
            rows.append(_sharded_run(entry, args))
            if "error" not in rows[-1]:
                break
    return {"rows": rows, "gpus": args.gpus}


def _sharded_run(entry: str, args) -> dict:
    from hsae_jax.parallel.plan import LOW_MEMORY

    f, _, option = entry.partition(":")
    extra = dict(LOW_MEMORY) if option == "low" else {}
    name = f"sharded-F{f}{'-low' if option == 'low' else ''}"
    row = run_training(name, _base(args, n_latents=int(f), mesh=f"data=1,model={args.gpus}",
                                   steps=args.sharded_steps, eval_batches=2, **extra),
                       args, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97"})
    row.update(n_latents=int(f), options="low-memory" if option == "low" else "default")
    png = os.path.join(row["run_dir"], "fvu_vs_k.png")
    if os.path.exists(png):
        row["fvu_png"] = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                      f"fvu_vs_k-{name}.png")
        shutil.copy(png, row["fvu_png"])
    drop_large_files(row["run_dir"])
    return row


def drop_large_files(run_dir: str) -> None:
    """Removes a finished run's checkpoints and model file (tens of GB for these
    dictionaries: the next run's disk check counts on the space), keeping its metrics and
    plots."""
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    model = os.path.join(run_dir, "sae.safetensors")
    if os.path.exists(model):
        os.remove(model)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="all", choices=("all", "correctness", "scaling", "sharded"))
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    p.add_argument("--batch", type=int, default=4096, help="rows per data shard")
    p.add_argument("--n-latents", type=int, default=65536)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="steps of the scaling runs")
    p.add_argument("--correct-steps", type=int, default=20)
    p.add_argument("--sharded-steps", type=int, default=200)
    p.add_argument("--sharded", default=SHARDED_DEFAULT, help="F[:low],... (see above)")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the float16 file")
    p.add_argument("--no-file-runs", dest="file_runs", action="store_false")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="correctness: largest relative difference of a metric called the same")
    p.add_argument("--synthetic-features", type=int, default=16384)
    p.add_argument("--synthetic-active", type=float, default=48.0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--work-dir", default="/tmp/hsae-multi-gpu")
    p.add_argument("--tiny", action="store_true", help="CPU size (2 host devices)")
    p.add_argument("--out", default="multi_gpu.json")
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.tiny:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=2").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.batch, args.n_latents, args.d_model, args.k = 32, 256, 32, 8
        args.steps, args.correct_steps, args.sharded_steps, args.rows = 8, 4, 4, 512
        args.synthetic_features, args.synthetic_active = 64, 6.0
        args.sharded = "512,1024:low" if args.sharded == SHARDED_DEFAULT else args.sharded
        args.backend = "xla" if args.backend == "auto" else args.backend
    import jax

    from hsae_jax.bench import common
    from hsae_jax.io_utils import atomic_write_json

    args.gpus = args.gpus or jax.device_count()
    if args.gpus < 2:
        raise SystemExit(f"needs 2 or more devices; this machine has {jax.device_count()}")
    os.makedirs(args.work_dir, exist_ok=True)
    payload = {"benchmark": "multi_gpu", "device": common.device_info(), "gpus": args.gpus,
               "workload": dict(batch_per_data_shard=args.batch, n_latents=args.n_latents,
                                d_model=args.d_model, k=args.k, backend=args.backend)}
    modes = ("correctness", "scaling", "sharded") if args.mode == "all" else (args.mode,)
    for mode in modes:
        print(f"== {mode}", flush=True)
        payload[mode] = {"correctness": correctness, "scaling": scaling,
                         "sharded": sharded}[mode](args)
        atomic_write_json(args.out, payload)  # what is done so far survives a timeout
    if "correctness" in payload:
        c = payload["correctness"]
        print(f"\ncorrectness ({c.get('steps')} steps, TF32 off; relative to 1 GPU):")
        print(common.markdown_table(c["rows"], [
            ("mesh", "run", "s"), ("worst_metric_rel", "metrics", ".1e"),
            ("fvu_per_k_rel_diff", "FVU per k", ".1e"),
            ("worst_param_abs", "parameters (abs)", ".1e"),
            ("same", "same", "s"), ("error", "error", "s")]))
    if "scaling" in payload:
        print(f"\nscaling (B={args.batch} rows per GPU, F={args.n_latents}):")
        print(common.markdown_table(payload["scaling"]["rows"], [
            ("data", "data", "s"), ("mesh", "mesh", "s"), ("tokens_per_s", "tokens/s", ",.0f"),
            ("speedup", "vs 1 GPU", ".2f"), ("error", "error", "s")]))
    if "sharded" in payload:
        rows = payload["sharded"]["rows"]
        for r in rows:
            if r.get("fvu_per_k"):
                fk = r["fvu_per_k"]
                ks = sorted({k for k in (1, 8, 16, 32, len(fk)) if k <= len(fk)})
                r["fvu_k"] = " / ".join(f"{fk[k - 1]:.3f}" for k in ks)
        print(f"\nlatent-sharded runs (model={args.gpus}, {args.sharded_steps} steps):")
        print(common.markdown_table(rows, [
            ("n_latents", "F", "d"), ("options", "options", "s"),
            ("tokens_per_s", "tokens/s", ",.0f"), ("max_peak_gb", "peak GB/device", ".1f"),
            ("plan_gb", "plan GB", ".1f"), ("fvu_k", "FVU k=1/8/16/32/K", "s"),
            ("error", "error", "s")]))
    print(f"\nwrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
