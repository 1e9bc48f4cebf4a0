"""Every setting of ``hsae train``, with its default and help, in one place.

``TrainConfig`` holds the model's :class:`SAEConfig` (``sae``) and the settings of the run
itself; the command line is flat (``--n-latents`` sets ``sae.n_latents``, ``--steps``
sets ``steps``): :meth:`TrainConfig.from_flat` and :meth:`TrainConfig.to_flat` map
between the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hsae_jax import backends
from hsae_jax.data import SyntheticConfig, open_source
from hsae_jax.encoder import SparseEncoderConfig
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.model import INT32_MAX, SAEConfig, setting
from hsae_jax.parallel.mesh import MeshShape

SAE_FIELDS = tuple(f.name for f in dataclasses.fields(SAEConfig))
DEFAULT_WARMUP_STEPS = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    sae: SAEConfig = SAEConfig()
    # what runs the ops (not part of the model)
    backend: str = setting("auto", "auto, triton, interpret, xla or reference")
    deterministic: bool = setting(
        False, "bitwise-reproducible loss and gradients on the Triton kernels (slower)")
    # optimisation
    batch_size: int = setting(1024, "tokens per step (split over all devices)")
    steps: int = setting(2000, "optimizer steps")
    lr: float | None = setting(None, "peak Adam learning rate (default: 2e-4 / sqrt(F / 2^14))")
    warmup_steps: int | None = setting(
        None, "linear warm-up steps, at most --steps (default: min(100, steps))")
    decay_fraction: float = setting(0.2, "linear decay to 0 over this final fraction of steps")
    clip_norm: float = setting(1.0, "global gradient-norm clip (0: off)")
    seed: int = setting(0, "seed of the initialisation and the data order")
    # data
    data: str | None = setting(None, "activations: a cache directory (hsae harvest), a [N, D] "
                               ".npy / .safetensors file, or a glob of files; default: the "
                               "embedded synthetic generator")
    data_key: str | None = setting(None, "tensor name inside .safetensors files")
    eval_fraction: float | None = setting(
        None, "share of --data rows held out for evaluation (default: enough for "
        "--eval-batches, at most a tenth; 0: evaluate on training rows)")
    eval_data: str | None = setting(None, "separate activations to evaluate on (nothing is "
                                    "held out of --data then)")
    block_rows: int = setting(16, "consecutive rows read together when mixing --data")
    prefetch: int = setting(4, "batches read ahead of the step on a background thread")
    synthetic_features: int = setting(256, "synthetic data: number of true features")
    synthetic_active: float = setting(12.0, "synthetic data: mean active features per token")
    # bookkeeping
    log_every: int = setting(50, "steps between progress/metrics.jsonl records")
    eval_every: int = setting(500, "steps between evaluations (FVU at every k)")
    eval_batches: int = setting(4, "batches per evaluation")
    save_every: int = setting(500, "steps between checkpoints of the training state")
    devices: int | None = setting(None, "devices to use (default: all)")
    max_skipped_fraction: float = setting(
        0.1, "the run fails (exit status 1, files kept) when more than this fraction of its "
        "steps were skipped for a non-finite loss or gradient; it always fails when all were")
    # meshes, memory and several processes (hsae_jax.parallel)
    mesh: str | None = setting(
        None, "devices per mesh axis, e.g. data=2,model=4: the batch is split over data, the "
        "dictionary over model (default: every device on data)")
    param_dtype: str = setting("float32", "storage of W_enc and W_dec: float32 or bfloat16 "
                               "(bfloat16 needs --compute-dtype bfloat16)")
    adam_dtype: str = setting("float32", "storage of the Adam moments: float32 or bfloat16")
    encoder_rows: int | None = setting(
        None, "rows of the batch the encoder scores at once (default: all); fewer keep the "
        "[rows, F/m] pre-activations small, with the same result")
    update_blocks: int | None = setting(
        None, "update the parameters in this many blocks of latents, one after the other "
        "(default: all at once); the same result, the optimizer's float32 intermediates one "
        "block's (must divide F/m)")
    coordinator: str | None = setting(
        None, "several processes: HOST:PORT of process 0, or auto (SLURM, Open MPI); default "
        "$JAX_COORDINATOR_ADDRESS, else one process")
    num_processes: int | None = setting(None, "several processes: how many "
                                        "(default $JAX_NUM_PROCESSES)")
    process_id: int | None = setting(None, "several processes: this one's rank "
                                     "(default $JAX_PROCESS_ID)")

    def __post_init__(self):
        if not isinstance(self.sae, SAEConfig):
            raise TypeError(f"TrainConfig.sae must be a SAEConfig, got {type(self.sae).__name__}")
        backends.validate_backend(self.backend)
        for name in ("batch_size", "steps", "log_every", "eval_every", "eval_batches",
                     "save_every", "synthetic_features", "block_rows", "prefetch"):
            _check_int(name, getattr(self, name), 1, INT32_MAX)
        if self.warmup_steps is None:  # frozen: set once, here
            object.__setattr__(self, "warmup_steps", min(DEFAULT_WARMUP_STEPS, self.steps))
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be <= "
                             f"TrainConfig.steps={self.steps}")
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.devices is not None:
            _check_int("devices", self.devices, 1, INT32_MAX)
        MeshShape.parse(self.mesh)
        for name in ("param_dtype", "adam_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be float32 "
                                 "or bfloat16")
        if self.param_dtype == "bfloat16" and self.sae.compute_dtype != "bfloat16":
            raise ValueError("TrainConfig.param_dtype='bfloat16' needs "
                             "SAEConfig.compute_dtype='bfloat16' (the matmuls read the stored "
                             "weights)")
        for name in ("encoder_rows", "update_blocks"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, INT32_MAX)
        for name in ("num_processes", "process_id"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1 if name == "num_processes" else 0)
        _check_float("decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check_float("clip_norm", self.clip_norm, 0.0)
        _check_float("synthetic_active", self.synthetic_active, 0.0, inclusive=False)
        _check_float("max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0)
        for name in ("data", "data_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"TrainConfig.{name}={value!r} must be a str (or None)")
        if self.lr is not None:
            _check_float("lr", self.lr, 0.0, inclusive=False)
        if self.eval_fraction is not None:
            _check_float("eval_fraction", self.eval_fraction, 0.0, 0.9)
        if self.eval_data is not None and self.eval_fraction:
            raise ValueError("TrainConfig.eval_data replaces the held-out rows: leave "
                             "--eval-fraction unset with --eval-data")
        if self.eval_data is not None and self.data is None:
            raise ValueError("TrainConfig.eval_data needs --data (the synthetic generator "
                             "evaluates on its own batches)")

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainConfig:
        """A TrainConfig from flat settings (SAEConfig's fields and TrainConfig's own).

        ``budgets`` may be a tuple of ints or a comma-separated string.
        """
        sae = {k: settings.pop(k) for k in SAE_FIELDS if k in settings}
        if isinstance(sae.get("budgets"), str):
            sae["budgets"] = parse_budgets(sae["budgets"])
        if sae.get("budgets") is not None:
            sae["budgets"] = tuple(sae["budgets"])
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)} - {"sae"}
        if unknown:
            raise TypeError(f"unknown training settings: {sorted(unknown)}")
        return cls(sae=SAEConfig(**sae), **settings)

    def to_flat(self) -> dict[str, Any]:
        """The settings as one flat, JSON-ready dict (what cfg.json and checkpoints keep)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sae"}
        sae = {name: getattr(self.sae, name) for name in SAE_FIELDS}
        if sae["budgets"] is not None:
            sae["budgets"] = list(sae["budgets"])
        return {**sae, **flat}

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """The TrainConfig of a flat dict written by :meth:`to_flat` (keys it does not know
        are ignored; older runs saved budgets as a string)."""
        known = set(SAE_FIELDS) | {f.name for f in dataclasses.fields(cls)}
        flat = {k: v for k, v in saved.items() if k in known and k != "sae"}
        steps, warmup = flat.get("steps"), flat.get("warmup_steps")
        if isinstance(steps, int) and isinstance(warmup, int) and warmup > steps:
            # saved before warm-up was checked against steps: its warm-up never ended,
            # which a warm-up of `steps` is the nearest valid setting to
            flat["warmup_steps"] = steps
        return cls.from_flat(**flat)

    def replace(self, **settings: Any) -> TrainConfig:
        """A copy with flat ``settings`` changed (model or run settings alike)."""
        return TrainConfig.from_flat(**{**self.to_flat(), **settings})

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.sae.n_latents / 2**14)

    def open_source(self):
        """The activation source these settings name: the data file, or the synthetic
        generator (``batch(step)``, ``d_model``, ``describe()``)."""
        synthetic = SyntheticConfig(d_model=self.sae.d_model, n_features=self.synthetic_features,
                                    mean_active=self.synthetic_active, seed=self.seed)
        return open_source(self.data, self.batch_size, seed=self.seed, data_key=self.data_key,
                           synthetic=synthetic, eval_fraction=self.eval_fraction,
                           eval_batches=self.eval_batches, eval_data=self.eval_data,
                           block_rows=self.block_rows)

    def row_blocks(self):
        """The update's blocks of latents (``RowBlocks``), or None for the whole update."""
        from hsae_jax.parallel.row_blocks import RowBlocks

        if self.update_blocks is None:
            return None
        return RowBlocks(self.update_blocks, self.clip_norm)

    def kernels(self) -> KernelSettings:
        """The runtime settings of the ops: ``backend``, ``deterministic``, ``encoder_rows``."""
        settings = KernelSettings.create(self.backend, deterministic=self.deterministic)
        if self.encoder_rows is None:
            return settings
        return dataclasses.replace(settings,
                                   encoder=SparseEncoderConfig(forward_rows=self.encoder_rows))


def parse_budgets(text: str) -> tuple[int, ...] | None:
    """``"8,16,32"`` -> (8, 16, 32); empty -> None. ValueError names the flag."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        budgets = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--budgets={text!r} must be comma-separated integers, e.g. 8,16,32"
                         ) from None
    return budgets or None


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= {low}")
    if high is not None and value > high:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an int <= {high}")


def _check_float(name: str, value, low: float, high: float = math.inf,
                 inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low <= value <= high) if inclusive else (low < value <= high)
    if not ok:
        where = f"in [{low}, {high}]" if high != math.inf else (
            f">= {low}" if inclusive else f"> {low}")
        raise ValueError(f"TrainConfig.{name}={value!r} must be a finite number {where}")
