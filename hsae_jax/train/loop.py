"""``train``: the loop around the jitted step, with progress, evaluation and checkpoints.

A run folder holds:
- ``sae.safetensors`` + ``cfg.json``: the trained model (:meth:`HierarchicalTopKSAE.load`);
- ``metrics.json``: the final evaluation (``fvu_per_k``, ``fvu``, ``mse``, ``l0``,
  ``dead_fraction``, ...); ``metrics.jsonl``: one record per log / evaluation step;
- ``fvu_vs_k.png``, ``loss.png``;
- ``checkpoints/``: the training state (params, optimizer state, counters, step) for
  ``--resume``. Data order and initialisation follow from the seed and the step, so a
  resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax

from hsae_jax.data import eval_batches
from hsae_jax.data.loader import Prefetcher
from hsae_jax.io_utils import atomic_write, atomic_write_json
from hsae_jax.model import save_model_files
from hsae_jax.parallel import MeshShape, distributed, make_layout
from hsae_jax.parallel.evaluate import evaluate_sharded
from hsae_jax.parallel.state import abstract_state, host_arrays, init_state
from hsae_jax.plots import plot_fvu_vs_k, plot_training_curves
from hsae_jax.train.checkpoint import Checkpointer
from hsae_jax.train.config import TrainConfig
from hsae_jax.train.step import learning_rate_schedule, make_optimizer, make_train_step

# settings a resumed run may change; every other one must match the checkpoint (a run
# saved on one mesh resumes on any other: checkpoints are restored into the new layout)
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "eval_batches", "save_every",
                     "devices", "backend", "prefetch", "mesh", "coordinator",
                     "num_processes", "process_id", "encoder_rows"}


def read_records(path: str, upto_step: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to and including ``upto_step``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["step"] <= upto_step]


def _write_records(path: str, records: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    atomic_write(path, write)


def _check_resumable(saved: dict, tc: TrainConfig) -> None:
    now = tc.to_flat()
    saved = TrainConfig.from_saved(saved).to_flat()
    diff = {k: (saved.get(k), v) for k, v in now.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        raise ValueError(
            "--resume: these settings differ from the checkpoint's (saved, now): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))


class _Records:
    """metrics.jsonl and the progress bar: what a run reports while it trains."""

    def __init__(self, path: str, tc: TrainConfig, schedule, start: int, progress: bool):
        self.path, self.tc, self.schedule = path, tc, schedule
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
        self.last_eval: dict = {}
        self.started = self.last_time = time.perf_counter()
        self.last_step = start

    def evaluation(self, step: int, metrics: dict) -> None:
        self.last_eval = metrics
        self.file.write(json.dumps({"step": step, "eval": metrics}) + "\n")

    def training(self, step: int, metrics) -> None:
        """One record of the step's metrics and the throughput since the last record."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        # throughput over this log interval (the first one includes compilation)
        rate = (step - self.last_step) * self.tc.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, step
        self.file.write(json.dumps({"step": step, **m, "lr": float(self.schedule(step - 1)),
                                    "tokens_per_s": rate, "elapsed_s": now - self.started})
                        + "\n")
        self.file.flush()
        if self.bar is not None:
            fvu = self.last_eval.get("fvu", float("nan"))
            self.bar.set_postfix(loss=f"{m['loss']:.4g}", fvu=f"{fvu:.3f}", l0=f"{m['l0']:.1f}",
                                 dead=f"{m['dead_fraction']:.2f}",
                                 skipped=int(m["skipped_steps"]), refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()


def _init_or_restore(tc: TrainConfig, cfg, tx, source, ckpt: Checkpointer, jsonl: str,
                     resume: bool, out_dir: str, log, layout) -> tuple[dict, int]:
    """(state, first step): a fresh state, or the one in the latest checkpoint, laid out
    on ``layout``'s mesh."""

    def fresh_state():
        return init_state(layout, cfg, tx, tc.seed, source.batch(0), tc.param_dtype)

    if resume:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"--resume {out_dir}: no checkpoint under {ckpt.directory}")
        _check_resumable(ckpt.meta()["train_config"], tc)
        # shapes and this mesh's shardings only: each device reads its own blocks
        state, meta = ckpt.restore(abstract_state(layout, cfg, tx, tc.param_dtype))
        start = int(meta["step"])
        log(f"resuming {out_dir} at step {start}")
        _write_records(jsonl, read_records(jsonl, start))  # drop records past the checkpoint
        return state, start
    if ckpt.latest_step() is not None:
        raise FileExistsError(f"{out_dir} already holds a run: use --resume {out_dir} or "
                              "another --out")
    _write_records(jsonl, [])
    return fresh_state(), 0


def train(tc: TrainConfig, out_dir: str, *, resume: bool = False, source=None,
          progress: bool = True, log=print) -> dict:
    """Trains an SAE as ``tc`` says, writing the run folder ``out_dir``; returns metrics.json.

    ``source`` (anything with ``batch(step) -> [batch_size, D]``, ``d_model`` and
    ``describe()``) replaces the data ``tc`` names. With ``resume``, continues from the
    last complete checkpoint in ``out_dir``.
    """
    distributed.initialize(tc.coordinator, tc.num_processes, tc.process_id)
    primary = distributed.is_primary()  # writes the run folder's files; every process trains
    if not primary:
        log, progress = (lambda *_: None), False
    os.makedirs(out_dir, exist_ok=True)
    source = source or tc.open_source()
    cfg = dataclasses.replace(tc.sae, d_model=source.d_model)
    kernels = tc.kernels()
    layout = make_layout(MeshShape.parse(tc.mesh), tc.devices)
    layout.check(cfg, tc.batch_size)
    tx = make_optimizer(tc, layout)
    ckpt = Checkpointer(out_dir)
    # other processes keep their records in a scratch folder: the run folder's are process 0's
    scratch = None if primary else tempfile.mkdtemp(prefix="hsae-records-")
    jsonl = os.path.join(scratch or out_dir, "metrics.jsonl")
    state, start = _init_or_restore(tc, cfg, tx, source, ckpt, jsonl, resume, out_dir, log,
                                    layout)
    held_out = eval_batches(source, tc.eval_batches)
    true_features = getattr(source, "features", None)
    log(f"training {cfg.objective} SAE D={cfg.d_model} F={cfg.n_latents} K={cfg.k} on "
        f"{source.describe()}; batch {tc.batch_size} x {tc.steps} steps on "
        f"{layout.describe()}, backend {kernels.backend}")

    def evaluate_state(params, stats):
        return evaluate_sharded(cfg, layout, params, stats, held_out, true_features,
                                kernels=kernels)

    records = _Records(jsonl, tc, learning_rate_schedule(tc), start, progress)
    step_fn = make_train_step(cfg, tx, layout, kernels)
    share, shares = layout.process_rows(tc.batch_size)  # this process reads its rows only
    batches = Prefetcher(source, range(start, tc.steps),
                         lambda x: layout.put_batch(x, tc.batch_size), depth=tc.prefetch,
                         process_index=share, process_count=shares)
    try:
        for step, x in batches:
            *values, metrics = step_fn(state["params"], state["stats"], state["opt_state"], x)
            state = dict(zip(("params", "stats", "opt_state"), values, strict=True))
            done = step + 1
            final = done == tc.steps
            if done % tc.eval_every == 0 or final:
                records.evaluation(done, evaluate_state(state["params"], state["stats"]))
            if done % tc.log_every == 0 or final:
                records.training(done, metrics)
            records.advance()
            if done % tc.save_every == 0 or final:
                records.flush()
                ckpt.save(done, state, {"step": done, "train_config": tc.to_flat(),
                                        "skipped_steps": int(state["opt_state"].total_notfinite)})
    finally:
        batches.close()
        records.close()
        ckpt.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    last_eval = records.last_eval or evaluate_state(state["params"], state["stats"])
    # with several processes the blocks are gathered (every process takes part)
    state = {**state, "params": host_arrays(state["params"]),
             "stats": host_arrays(state["stats"])}
    if not primary:
        return {**last_eval, "steps": tc.steps,
                "skipped_steps": int(state["opt_state"].total_notfinite)}
    return _finish(tc, cfg, state, last_eval, source, out_dir, jsonl, log)


def _finish(tc: TrainConfig, cfg, state, last_eval: dict, source, out_dir: str, jsonl: str,
            log) -> dict:
    """Writes the model, metrics.json and the plots; returns metrics.json's contents."""
    data = {"source": source.describe(), **(source.split() if hasattr(source, "split") else {})}
    save_model_files(out_dir, cfg, state["params"], state["stats"],
                     {"train": tc.to_flat(), "data": data})
    summary = {**last_eval, "steps": tc.steps,
               "skipped_steps": int(state["opt_state"].total_notfinite)}
    atomic_write_json(os.path.join(out_dir, "metrics.json"), summary)
    plot_fvu_vs_k({f"{cfg.objective} K={cfg.k}": summary["fvu_per_k"]},
                  os.path.join(out_dir, "fvu_vs_k.png"))
    plot_training_curves(read_records(jsonl, tc.steps), os.path.join(out_dir, "loss.png"))
    log(f"done: FVU at K {summary['fvu']:.4f}, L0 {summary['l0']:.2f}, dead "
        f"{summary['dead_fraction']:.3f}; wrote {out_dir}")
    return summary
