"""The trainer's own loop, end to end, on the data users train on: ``hsae bench --train``.

Each run is ``hsae_jax.train.train`` writing a real run folder; its tokens/s come from
the run's own ``metrics.jsonl`` (steady state: the median over the log intervals after
the first, which holds compilation). Runs:

- ``synthetic``: the embedded generator (batches made on the device);
- ``npy-float32`` / ``npy-float16``: one ``[N, D]`` ``.npy`` file of activations;
- ``cache-float16``: a sharded activation cache (docs/activation-cache.md);
- ``dead-auxk`` / ``dead-no-auxk``: synthetic data with ``dead_fraction`` (10%) of the
  latents dead, AuxK on and off (the pair the AuxK goal compares);
- ``npy-float16-dead-auxk``: the float16 file with the same dead latents and AuxK on (what
  a real run with dead latents gets).

The dead latents are made so: the run trains one step and checkpoints, the first
``dead_fraction`` of the latents get their encoder rows scaled by ``DEAD_SCALE`` and their
encoder bias set to 0 (their pre-activations, about half of them positive, stay far below
every token's top K: AuxK selects among real values and trains them) and their counters
set to ``dead_tokens``, and the trainer resumes from that checkpoint for the timed steps
(``hsae_jax.train.resume``). The table's dead fraction is the measured one.

For the file runs the data path is also timed alone (the prefetching loader with no step
behind it): "loader alone tokens/s" is the ceiling the data path puts on a run.

The data files hold rows of the synthetic generator (written once into ``work_dir``), so
every run trains on the same kind of activations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax.bench import common
from hsae_jax.data import CacheWriter, Prefetcher
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.train import TrainConfig, resume, train

RUNS = ("synthetic", "npy-float32", "npy-float16", "cache-float16", "dead-auxk",
        "dead-no-auxk", "npy-float16-dead-auxk")
# more runs by name: a "-bf16" suffix on a dead-auxk run puts AuxK's matmuls on bfloat16
# operands (--auxk-dtype bfloat16), e.g. "dead-auxk-bf16", "npy-float16-dead-auxk-bf16";
# what AuxK costs while no latent is dead, beside "synthetic" (AuxK on, its [B, F] scores
# kept, nothing dead): "synthetic-no-auxk" (--auxk-coef 0: no AuxK in the step) and
# "synthetic-no-scores" (--auxk-max-fraction 0.25: AuxK on, its columns computed, not kept)
IDLE_AUXK_RUNS = {"synthetic-no-auxk": {"auxk_coef": 0.0},
                  "synthetic-no-scores": {"auxk_max_fraction": 0.25}}
DEAD_SCALE = 0.1  # shrinks a latent's pre-activations out of every token's top K


@dataclasses.dataclass
class TrainBenchSettings:
    batch: int = 4096
    n_latents: int = 65536
    d_model: int = 2304
    k: int = 64
    steps: int = 300
    log_every: int = 25
    rows: int = 400_000
    # the trainer's default: with dead_tokens within a batch or two of 0 (8192 until the
    # fourteenth session) AuxK's bucket bound (hsae_jax.train.auxk_buckets) also counts
    # every live latent that skipped the last batch
    dead_tokens: int = 1_000_000
    dead_fraction: float = 0.1
    synthetic_features: int = 16384
    synthetic_active: float = 48.0
    backend: str = "auto"
    runs: tuple[str, ...] = RUNS
    work_dir: str = "bench_train_runs"
    out: str = "bench_train.json"

    @classmethod
    def tiny(cls, **overrides) -> TrainBenchSettings:
        base = dict(batch=64, n_latents=256, d_model=32, k=8, steps=24, log_every=4, rows=4096,
                    dead_tokens=100_000, synthetic_features=64, synthetic_active=6.0)
        return cls(**{**base, **overrides})


def _common(s: TrainBenchSettings) -> dict:
    return dict(d_model=s.d_model, n_latents=s.n_latents, k=s.k, batch_size=s.batch,
                steps=s.steps, log_every=s.log_every, eval_every=s.steps, save_every=s.steps,
                eval_batches=1, warmup_steps=min(100, s.steps // 4), backend=s.backend,
                synthetic_features=s.synthetic_features, synthetic_active=s.synthetic_active)


def write_data(s: TrainBenchSettings, log=print) -> dict[str, str]:
    """The data files of the file runs, from the synthetic generator (made once)."""
    os.makedirs(s.work_dir, exist_ok=True)
    source = TrainConfig.from_flat(**_common(s)).open_source()
    paths = {"npy-float32": os.path.join(s.work_dir, "acts-float32.npy"),
             "npy-float16": os.path.join(s.work_dir, "acts-float16.npy"),
             "cache-float16": os.path.join(s.work_dir, "cache-float16")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    log(f"writing {s.rows} x {s.d_model} rows of synthetic activations to {s.work_dir}")
    f32 = np.lib.format.open_memmap(paths["npy-float32"] + ".tmp.npy", mode="w+",
                                    dtype=np.float32, shape=(s.rows, s.d_model))
    f16 = np.lib.format.open_memmap(paths["npy-float16"] + ".tmp.npy", mode="w+",
                                    dtype=np.float16, shape=(s.rows, s.d_model))
    with CacheWriter(paths["cache-float16"], s.d_model, dtype="float16",
                     rows_per_shard=max(1, s.rows // 8), overwrite=True,
                     provenance={"source": "hsae bench --train: synthetic"}) as cache:
        step = 10_000  # batches no training run draws
        for start in range(0, s.rows, s.batch):
            rows = np.asarray(source.batch(step))[: s.rows - start]
            step += 1
            f32[start:start + len(rows)] = rows
            f16[start:start + len(rows)] = rows
            cache.append(rows)
    for name in ("npy-float32", "npy-float16"):
        (f32 if name.endswith("32") else f16).flush()
        os.replace(paths[name] + ".tmp.npy", paths[name])
    settle_written_files(log)
    return paths


def settle_written_files(log=print) -> None:
    """Waits until the data just written is on disk (``os.sync``), so that the runs that
    read it are not timed while the kernel writes gigabytes of dirty pages back. (On the
    H200 this did not explain the spread of the file runs, 0.87-1.14 of the synthetic
    speed: benchmarks/NOTES.md, eighth session.)"""
    started = time.perf_counter()
    os.sync()
    log(f"data on disk ({time.perf_counter() - started:.1f} s to flush)")


def loader_tokens_per_s(tc: TrainConfig, steps: int) -> float:
    """Tokens/s of the data path alone (read, copy to the device, finiteness check), with
    the trainer's prefetch settings and batch placement and no training step to hide
    behind."""
    from hsae_jax.parallel import MeshShape, make_layout

    source = tc.open_source()
    layout = make_layout(MeshShape.parse(tc.mesh), tc.devices)
    put = functools.partial(layout.put_batch, batch_size=tc.batch_size)
    with Prefetcher(source, range(2), put, depth=tc.prefetch) as warm:
        for _ in warm:
            pass
    start = time.perf_counter()
    with Prefetcher(source, range(2, 2 + steps), put, depth=tc.prefetch) as batches:
        for _, x in batches:
            last = x
    jax.block_until_ready(last)
    return steps * tc.batch_size / (time.perf_counter() - start)


def kill_latents(run_dir: str, tc: TrainConfig, d_model: int, fraction: float) -> int:
    """Makes the first ``fraction`` of the latents dead in the newest checkpoint of
    ``run_dir`` (saved again as the next step): encoder rows times ``DEAD_SCALE``, encoder
    bias 0, counters at ``dead_tokens``. Returns the step to resume from."""
    from hsae_jax.parallel import MeshShape, make_layout
    from hsae_jax.parallel.state import abstract_state
    from hsae_jax.train.checkpoint import Checkpointer
    from hsae_jax.train.step import make_optimizer

    cfg = dataclasses.replace(tc.sae, d_model=d_model)
    layout = make_layout(MeshShape.parse(tc.mesh), tc.devices)
    ckpt = Checkpointer(run_dir)
    try:
        state, meta = ckpt.restore(abstract_state(layout, cfg, make_optimizer(tc, layout),
                                                  tc.param_dtype))
        n = int(round(fraction * cfg.n_latents))
        params, stats = dict(state["params"]), dict(state["stats"])
        params["W_enc"] = params["W_enc"].at[:n].multiply(DEAD_SCALE)
        params["b_enc"] = params["b_enc"].at[:n].set(0)
        since = stats["tokens_since_fired"]
        stats["tokens_since_fired"] = since.at[:n].set(
            jnp.maximum(since[:n], cfg.dead_tokens))
        step = meta["step"] + 1
        ckpt.save(step, {**state, "params": params, "stats": stats}, {**meta, "step": step})
    finally:
        ckpt.close()
    return step


def steady_tokens_per_s(run_dir: str, after: int = 0) -> dict:
    """Median tokens/s over the full log intervals of the steps after ``after`` (a resumed
    run's first step), leaving out the first one (compilation) and a shorter last one (the
    run's end off the log grid, which also holds the final evaluation), and more."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    logs = [r for r in records if "tokens_per_s" in r and r["step"] > after]
    ends = [r["step"] for r in logs]
    lengths = [b - a for a, b in zip([after, *ends[:-1]], ends, strict=True)]
    full = max(lengths[1:], default=0)
    rates = [r["tokens_per_s"] for r, n in zip(logs[1:], lengths[1:], strict=True)
             if n == full] or [logs[-1]["tokens_per_s"]]
    return {"tokens_per_s": statistics.median(rates), "intervals": len(rates),
            "dead_fraction": logs[-1]["dead_fraction"],
            "auxk_loss": logs[-1]["auxk_loss"], "skipped_steps": logs[-1]["skipped_steps"]}


def run_settings(s: TrainBenchSettings, name: str, paths: dict[str, str]
                 ) -> tuple[dict, bool]:
    """(``hsae train`` settings, whether latents are killed) of the run ``name`` (one of
    :data:`RUNS`, :data:`IDLE_AUXK_RUNS`, or a dead-auxk run with "-bf16"); ``paths``: the
    data files by name (:func:`write_data`)."""
    flat = _common(s)
    base, bf16 = (name[:-len("-bf16")], True) if name.endswith("-bf16") else (name, False)
    if base in IDLE_AUXK_RUNS:
        return {**flat, **IDLE_AUXK_RUNS[base]}, False
    if base not in RUNS or (bf16 and not base.endswith("dead-auxk")):
        raise ValueError(f"--runs: unknown run {name!r}; runs: {', '.join(RUNS)}, "
                         f"{', '.join(IDLE_AUXK_RUNS)}, or a dead-auxk run with -bf16")
    data = base.replace("-dead-auxk", "")
    if data in paths:
        flat.update(data=paths[data], eval_fraction=0.01)
    dead = "dead" in name
    if dead:
        flat.update(dead_tokens=s.dead_tokens, warmup_steps=1,  # the 1-step run takes it
                    auxk_coef=0.0 if base.endswith("no-auxk") else 1.0 / 32.0)
    if bf16:
        flat.update(auxk_dtype="bfloat16")
    return flat, dead


def run(settings: TrainBenchSettings, log=print) -> dict:
    s = settings
    for name in s.runs:  # an unknown name fails here, before any data is written
        run_settings(s, name, {})
    log(f"trainer loop: B={s.batch} F={s.n_latents} D={s.d_model} K={s.k}, {s.steps} steps")
    paths = write_data(s, log) if any(r.startswith(("npy", "cache")) for r in s.runs) else {}
    rows = []
    for name in s.runs:
        flat, dead = run_settings(s, name, paths)
        run_dir = os.path.join(s.work_dir, f"run-{name}")
        if os.path.exists(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        row = {"run": name}
        buckets = []  # the trainer's AuxK buckets, as it names them when it first takes one
        quiet = lambda m, b=buckets: b.append(m) if "AuxK on" in m else None  # noqa: E731
        started = time.perf_counter()
        start = 0  # the first timed step
        try:
            tc = TrainConfig.from_flat(**flat)
            if name in paths:
                row["loader_tokens_per_s"] = loader_tokens_per_s(tc, min(s.steps, 50))
            if dead:  # one step, latents killed in its checkpoint, then the timed steps
                train(tc.replace(steps=1, save_every=1, eval_every=1), run_dir,
                      progress=False, log=lambda *_: None)
                start = kill_latents(run_dir, tc, s.d_model, s.dead_fraction)
                end = start + s.steps  # the saved 1-step settings would save every step
                resume(run_dir, steps=end, save_every=end, eval_every=end,
                       log_every=s.log_every, progress=False, log=quiet)
            else:
                train(tc, run_dir, progress=False, log=quiet)
            row.update(steady_tokens_per_s(run_dir, after=start))
            row["step_ms"] = s.batch / row["tokens_per_s"] * 1e3
        except Exception as err:  # noqa: BLE001 - one failure must not stop the table
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        row["wall_s"] = time.perf_counter() - started  # the whole run: compiling, saving too
        row["auxk_buckets"] = buckets
        log(f"  {name}: {row.get('tokens_per_s', row.get('error'))} tokens/s, loader alone "
            f"{row.get('loader_tokens_per_s', '-')}, {row['wall_s']:.0f} s"
            + "".join(f"\n    {b}" for b in buckets))
        rows.append(row)
    by = {r["run"]: r.get("tokens_per_s") for r in rows}
    for r in rows:
        base = by.get("dead-no-auxk" if r["run"].endswith(("dead-auxk", "dead-auxk-bf16"))
                      else "synthetic")
        if r.get("tokens_per_s") and base and r["run"] != "synthetic":
            r["vs_baseline"] = r["tokens_per_s"] / base
    payload = {"benchmark": "trainer_loop", "device": common.device_info(),
               "workload": dict(batch=s.batch, n_latents=s.n_latents, d_model=s.d_model,
                                k=s.k, steps=s.steps, rows=s.rows,
                                dead_tokens=s.dead_tokens, dead_fraction=s.dead_fraction),
               "devices": len(jax.devices()), "runs": rows}
    atomic_write_json(s.out, payload)
    log("")
    log(common.markdown_table(rows, [
        ("run", "run", "s"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_ms", "step ms", ".2f"),
        ("loader_tokens_per_s", "loader alone tokens/s", ",.0f"),
        ("vs_baseline", "vs baseline", ".2f"), ("dead_fraction", "dead", ".3f"),
        ("skipped_steps", "skipped", ".0f"), ("wall_s", "run s", ".0f"),
        ("error", "error", "s")]))
    log("baseline: synthetic (for the dead-...-auxk runs: dead-no-auxk)")
    log(f"\nwrote {s.out}")
    return payload
