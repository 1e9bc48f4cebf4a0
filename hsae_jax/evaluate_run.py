"""``hsae eval``: a saved run's metrics recomputed from its model files."""

from __future__ import annotations

import json
import os

from hsae_jax.data import eval_batches
from hsae_jax.evaluate import evaluate
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.model import load_model_files
from hsae_jax.train.config import TrainConfig


def evaluate_run(run_dir: str, *, data: str | None = None, data_key: str | None = None,
                 batches: int | None = None, backend: str | None = None) -> dict:
    """Loads ``run_dir``'s model and evaluates it on its data (or ``data``)."""
    cfg, params, stats = load_model_files(run_dir)
    with open(os.path.join(run_dir, "cfg.json")) as f:
        tc = TrainConfig.from_saved(json.load(f).get("train", {}))
    if data is not None:
        tc = tc.replace(data=data, data_key=data_key)
    kernels = KernelSettings.create(backend or tc.backend, deterministic=tc.deterministic)
    source = tc.open_source()
    if source.d_model != cfg.d_model:
        raise ValueError(f"data has D={source.d_model}; the model expects D={cfg.d_model}")
    metrics = evaluate(cfg, params, stats, eval_batches(source, batches or tc.eval_batches),
                       getattr(source, "features", None), kernels=kernels)
    return {"run_dir": run_dir, "data": source.describe(), "k": cfg.k, **metrics}


def metrics_table(metrics: dict) -> str:
    lines = [f"{metrics['run_dir']} on {metrics['data']} ({metrics['tokens']} tokens)", "",
             "| metric | value |", "|---|---|"]
    for key in ("fvu", "mse", "l0", "dead_fraction", "mean_max_cosine"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.5g} |")
    lines += ["", "| k | FVU |", "|---|---|"]
    lines += [f"| {k} | {v:.5f} |" for k, v in enumerate(metrics["fvu_per_k"], 1)]
    return "\n".join(lines)
