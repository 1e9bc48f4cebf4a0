"""Run folders for the interop tests: a random SAE and a quickly trained one.

Both have input_scale far from 1, non-zero b_enc and b_dec, F != D. The random one's
encoder bias is negative enough that many tokens have fewer than K positive
pre-activations (where ReLU-before-top-k libraries fill slots with zeros).
"""

from __future__ import annotations

import fcntl
import os

import jax.numpy as jnp
import numpy as np

from hsae_jax.data import SyntheticActivations, SyntheticConfig
from hsae_jax.model import SAEConfig, load_model_files, save_model_files
from hsae_jax.train import TrainConfig, train

D, F, K = 24, 96, 8
BUDGETS = (1, K // 2, K)
RANDOM_SCALE = 0.37
DATA_GAIN = 3.0  # the trained run's activations are synthetic data times this


def make_random_run(path: str, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    params = {
        "W_enc": jnp.asarray(rng.normal(size=(F, D)) / np.sqrt(D), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(size=F) * 0.5 - 1.2, jnp.float32),
        "W_dec": jnp.asarray(w_dec, jnp.float32),
        "b_dec": jnp.asarray(rng.normal(size=D) * 0.5, jnp.float32),
    }
    stats = {"input_scale": jnp.float32(RANDOM_SCALE),
             "tokens_since_fired": jnp.zeros((F,), jnp.int32)}
    save_model_files(path, SAEConfig(d_model=D, n_latents=F, k=K), params,
                     stats, {"model_name": "tiny-model", "hook_name": "blocks.1.hook_resid"})
    return path


class _Scaled:
    """A synthetic source whose activations are DATA_GAIN times larger (input_scale ~1/3)."""

    def __init__(self, seed: int):
        self.src = SyntheticActivations(
            SyntheticConfig(d_model=D, n_features=48, mean_active=6.0, seed=seed), 128)
        self.d_model = D

    def batch(self, step: int):
        return self.src.batch(step) * DATA_GAIN

    def describe(self) -> str:
        return f"{DATA_GAIN:g} x {self.src.describe()}"


def make_trained_run(path: str) -> str:
    tc = TrainConfig.from_flat(d_model=D, n_latents=F, k=K, batch_size=128, steps=30,
                     synthetic_features=48, synthetic_active=6.0, log_every=10,
                     eval_every=30, save_every=30, eval_batches=2, warmup_steps=5,
                     dead_tokens=512, backend="xla")
    train(tc, path, source=_Scaled(0), progress=False, log=lambda *_: None)
    return path


def shared_trained_run(tmp_path_factory) -> str:
    """make_trained_run once per test session, shared by the pytest-xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path = os.path.join(root, "interop_trained_run")
    with open(os.path.join(root, "interop_trained_run.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            make_trained_run(path + ".tmp")
            os.rename(path + ".tmp", path)
    return path


def activations(run_dir: str, seed: int, n: int = 256) -> np.ndarray:
    """Fresh activations [n, D] float32 in the run's units, never zeros: for the trained
    run, unseen batches of its data; else (b_dec + N(0, I)) / input_scale."""
    cfg, params, stats = load_model_files(run_dir)
    rng = np.random.default_rng(seed)
    scale = float(stats["input_scale"])
    x = (np.asarray(params["b_dec"]) + rng.normal(size=(n, cfg.d_model))) / scale
    if abs(scale - RANDOM_SCALE) > 1e-6:  # the trained run: unseen batches of its data
        source = _Scaled(0)
        steps = range(10_000 + 100 * seed, 10_000 + 100 * seed + -(-n // 128))
        x = np.concatenate([np.asarray(source.batch(s)) for s in steps])[:n]
    return np.asarray(x, np.float32)
