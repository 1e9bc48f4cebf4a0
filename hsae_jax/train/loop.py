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
import time

import jax

from hsae_jax.data import ActivationFile, SyntheticActivations, SyntheticConfig
from hsae_jax.evaluate import evaluate
from hsae_jax.io_utils import atomic_write, atomic_write_json
from hsae_jax.model import SAEConfig, init_arrays, save_model_files
from hsae_jax.plots import plot_fvu_vs_k, plot_training_curves
from hsae_jax.train.checkpoint import Checkpointer
from hsae_jax.train.config import TrainConfig
from hsae_jax.train.step import (
    learning_rate_schedule,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)

EVAL_STEP_OFFSET = 2**30  # synthetic evaluation batches come from steps no run reaches
# settings a resumed run may change; every other one must match the checkpoint
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "eval_batches", "save_every",
                     "devices", "backend"}


def make_source(tc: TrainConfig):
    if tc.data:
        return ActivationFile(tc.data, tc.batch_size, seed=tc.seed, tensor=tc.data_key)
    return SyntheticActivations(
        SyntheticConfig(d_model=tc.d_model, n_features=tc.synthetic_features,
                        mean_active=tc.synthetic_active, seed=tc.seed), tc.batch_size)


def sae_config(tc: TrainConfig, d_model: int) -> SAEConfig:
    return SAEConfig(d_model=d_model, n_latents=tc.n_latents, k=tc.k, objective=tc.objective,
                     budgets=tc.budget_tuple(), auxk_coef=tc.auxk_coef, aux_k=tc.aux_k,
                     dead_tokens=tc.dead_tokens, compute_dtype=tc.compute_dtype,
                     backend=tc.backend)


def eval_batches(source, count: int):
    if isinstance(source, SyntheticActivations):
        return [source.batch(EVAL_STEP_OFFSET + i) for i in range(count)]
    return [source.batch(i) for i in range(count)]


def _read_records(path: str, upto_step: int) -> list[dict]:
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
    now = dataclasses.asdict(tc)
    diff = {k: (saved.get(k), v) for k, v in now.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        raise ValueError(
            "--resume: these settings differ from the checkpoint's (saved, now): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))


def train(tc: TrainConfig, out_dir: str, *, resume: bool = False, source=None,
          progress: bool = True, log=print) -> dict:
    """Trains an SAE as ``tc`` says, writing the run folder ``out_dir``; returns metrics.json.

    ``source`` (anything with ``batch(step) -> [batch_size, D]`` and ``d_model``)
    replaces the data ``tc`` names. With ``resume``, continues from the last complete
    checkpoint in ``out_dir``.
    """
    tc.validate()
    os.makedirs(out_dir, exist_ok=True)
    source = source or make_source(tc)
    cfg = sae_config(tc, source.d_model)
    tx = make_optimizer(tc)
    schedule = learning_rate_schedule(tc)
    mesh = make_mesh(tc.devices)
    step_fn = make_train_step(cfg, tx, mesh)
    ckpt = Checkpointer(out_dir)
    jsonl = os.path.join(out_dir, "metrics.jsonl")

    def fresh_state():
        params, stats = init_arrays(cfg, jax.random.key(tc.seed), source.batch(0))
        return {"params": params, "stats": stats, "opt_state": tx.init(params)}

    start = 0
    if resume:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"--resume {out_dir}: no checkpoint under {ckpt.directory}")
        _check_resumable(ckpt.meta()["train_config"], tc)
        state, meta = ckpt.restore(jax.eval_shape(fresh_state))  # shapes only: no allocation
        start = int(meta["step"])
        log(f"resuming {out_dir} at step {start}")
        _write_records(jsonl, _read_records(jsonl, start))  # drop records past the checkpoint
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{out_dir} already holds a run: use --resume {out_dir} or "
                              "another --out")
    else:
        state = fresh_state()
        _write_records(jsonl, [])

    params, stats, opt_state = (replicate(state[n], mesh) for n in ("params", "stats",
                                                                    "opt_state"))
    held_out = eval_batches(source, tc.eval_batches)
    true_features = getattr(source, "features", None)
    log(f"training {cfg.objective} SAE D={cfg.d_model} F={cfg.n_latents} K={cfg.k} on "
        f"{source.describe()}; batch {tc.batch_size} x {tc.steps} steps on "
        f"{mesh.devices.size} device(s), backend {cfg.backend}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
    last_eval: dict = {}
    started = last_log = time.perf_counter()
    last_log_step = start
    with open(jsonl, "a") as records:
        for step in range(start, tc.steps):
            x = shard_batch(source.batch(step), mesh)
            params, stats, opt_state, metrics = step_fn(params, stats, opt_state, x)
            done = step + 1
            final = done == tc.steps
            if done % tc.eval_every == 0 or final:
                last_eval = evaluate(cfg, params, stats, held_out, true_features)
                records.write(json.dumps({"step": done, "eval": last_eval}) + "\n")
            if done % tc.log_every == 0 or final:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                # throughput over this log interval (the first one includes compilation)
                rate = (done - last_log_step) * tc.batch_size / (now - last_log)
                last_log, last_log_step = now, done
                record = {"step": done, **m, "lr": float(schedule(step)),
                          "tokens_per_s": rate, "elapsed_s": now - started}
                records.write(json.dumps(record) + "\n")
                records.flush()
                if bar is not None:
                    fvu = last_eval.get("fvu", float("nan"))
                    bar.set_postfix(loss=f"{m['loss']:.4g}", fvu=f"{fvu:.3f}",
                                    l0=f"{m['l0']:.1f}", dead=f"{m['dead_fraction']:.2f}",
                                    skipped=int(m["skipped_steps"]), refresh=False)
            if bar is not None:
                bar.update(1)
            if done % tc.save_every == 0 or final:
                records.flush()
                ckpt.save(done, {"params": params, "stats": stats, "opt_state": opt_state},
                          {"step": done, "train_config": dataclasses.asdict(tc),
                           "skipped_steps": int(opt_state.total_notfinite)})
    if bar is not None:
        bar.close()
    ckpt.close()

    save_model_files(out_dir, cfg, params, stats,
                     {"train": dataclasses.asdict(tc), "data": source.describe()})
    summary = {**(last_eval or evaluate(cfg, params, stats, held_out, true_features)),
               "steps": tc.steps, "skipped_steps": int(opt_state.total_notfinite)}
    atomic_write_json(os.path.join(out_dir, "metrics.json"), summary)
    plot_fvu_vs_k({f"{cfg.objective} K={cfg.k}": summary["fvu_per_k"]},
                  os.path.join(out_dir, "fvu_vs_k.png"))
    plot_training_curves(_read_records(jsonl, tc.steps), os.path.join(out_dir, "loss.png"))
    log(f"done: FVU at K {summary['fvu']:.4f}, L0 {summary['l0']:.2f}, dead "
        f"{summary['dead_fraction']:.3f}; wrote {out_dir}")
    return summary

