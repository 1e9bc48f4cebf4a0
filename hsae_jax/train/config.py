"""Every setting of ``hsae train``, with its default and help, in one place."""

from __future__ import annotations

import dataclasses
import math


def _f(default, help: str, **kw):  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    # the SAE
    d_model: int = _f(64, "D: activation width (ignored with --data: the file's width)")
    n_latents: int = _f(512, "F: number of latents")
    k: int = _f(16, "K: latents kept per token (the largest budget)")
    objective: str = _f("hierarchical", "hierarchical (every budget k <= K) or topk")
    budgets: str | None = _f(None, "comma-separated budgets to train for (default: all 1..K)")
    auxk_coef: float = _f(1.0 / 32.0, "weight of the AuxK loss on dead latents (0: off)")
    aux_k: int | None = _f(None, "latents used by AuxK (default: min(D/2, F))")
    dead_tokens: int = _f(200_000, "a latent not fired for this many tokens is dead")
    compute_dtype: str = _f("float32", "float32 or bfloat16 encoder/decoder inputs")
    backend: str = _f("auto", "auto, triton, interpret, xla or reference")
    # optimisation
    batch_size: int = _f(1024, "tokens per step (split over all devices)")
    steps: int = _f(2000, "optimizer steps")
    lr: float | None = _f(None, "peak Adam learning rate (default: 2e-4 / sqrt(F / 2^14))")
    warmup_steps: int = _f(100, "linear warm-up steps")
    decay_fraction: float = _f(0.2, "linear decay to 0 over this final fraction of steps")
    clip_norm: float = _f(1.0, "global gradient-norm clip (0: off)")
    seed: int = _f(0, "seed of the initialisation and the data order")
    # data
    data: str | None = _f(None, "activations file [N, D] (.npy or .safetensors); "
                          "default: the embedded synthetic generator")
    data_key: str | None = _f(None, "tensor name inside a .safetensors file")
    synthetic_features: int = _f(256, "synthetic data: number of true features")
    synthetic_active: float = _f(12.0, "synthetic data: mean active features per token")
    # bookkeeping
    log_every: int = _f(50, "steps between progress/metrics.jsonl records")
    eval_every: int = _f(500, "steps between evaluations (FVU at every k)")
    eval_batches: int = _f(4, "batches per evaluation")
    save_every: int = _f(500, "steps between checkpoints of the training state")
    devices: int | None = _f(None, "data-parallel devices to use (default: all)")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def budget_tuple(self) -> tuple[int, ...] | None:
        if not self.budgets:
            return None
        return tuple(int(b) for b in str(self.budgets).split(",") if b)

    def validate(self) -> None:
        positive = ("n_latents", "k", "batch_size", "steps", "log_every", "eval_every",
                    "eval_batches", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or not 0 <= self.decay_fraction <= 1:
            raise ValueError("--warmup-steps must be >= 0 and --decay-fraction in [0, 1]")
        if self.peak_lr() <= 0:
            raise ValueError(f"--lr={self.lr} must be > 0")
