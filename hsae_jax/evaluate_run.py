"""``hsae eval``: a saved run's metrics recomputed from its model files."""

from __future__ import annotations

import os

from hsae_jax.data import eval_batches
from hsae_jax.evaluate import evaluate
from hsae_jax.io_utils import read_json_object
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.model import load_model_files
from hsae_jax.train.config import TrainConfig
from hsae_jax.train.run_dir import has_checkpoint


def evaluate_run(run_dir: str, *, data: str | None = None, data_key: str | None = None,
                 batches: int | None = None, backend: str | None = None) -> dict:
    """Loads ``run_dir``'s model and evaluates it on its data (or ``data``)."""
    if batches is not None and (not isinstance(batches, int) or isinstance(batches, bool)
                                or batches < 1):
        raise ValueError(f"batches={batches!r} must be an int >= 1")
    _check_run_dir(run_dir)
    cfg, params, stats = load_model_files(run_dir)
    cfg_path = os.path.join(run_dir, "cfg.json")
    train_settings = read_json_object(cfg_path).get("train", {})
    if not isinstance(train_settings, dict):
        raise ValueError(f"{cfg_path}: 'train' must be an object (the run's settings), "
                         f"got {type(train_settings).__name__}")
    try:
        tc = TrainConfig.from_saved(train_settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: {err}") from None
    if data is not None:
        tc = tc.replace(data=data, data_key=data_key)
    kernels = KernelSettings.create(backend or tc.backend, deterministic=tc.deterministic)
    source = tc.open_source()
    if source.d_model != cfg.d_model:
        raise ValueError(f"data has D={source.d_model}; the model expects D={cfg.d_model}")
    metrics = evaluate(cfg, params, stats, eval_batches(source, batches or tc.eval_batches),
                       getattr(source, "features", None), kernels=kernels)
    return {"run_dir": run_dir, "data": source.describe(), "k": cfg.k, **metrics}


def _check_run_dir(run_dir: str) -> None:
    """A clear error for a folder that holds no saved model."""
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist")
    if not os.path.isdir(run_dir):
        raise NotADirectoryError(f"{run_dir} is a file, not a run folder")
    if not os.path.exists(os.path.join(run_dir, "cfg.json")):
        if has_checkpoint(run_dir):
            raise FileNotFoundError(
                f"{run_dir} has no saved model (cfg.json): the run stopped before its end, "
                f"where the model is written; finish it with hsae train --resume {run_dir}")
        raise FileNotFoundError(f"{run_dir} holds no saved model (no cfg.json)")


def metrics_table(metrics: dict) -> str:
    lines = [f"{metrics['run_dir']} on {metrics['data']} ({metrics['tokens']} tokens)", "",
             "| metric | value |", "|---|---|"]
    for key in ("fvu", "mse", "l0", "dead_fraction", "mean_max_cosine"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.5g} |")
    lines += ["", "| k | FVU |", "|---|---|"]
    lines += [f"| {k} | {v:.5f} |" for k, v in enumerate(metrics["fvu_per_k"], 1)]
    return "\n".join(lines)
