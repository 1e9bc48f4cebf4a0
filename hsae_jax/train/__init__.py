"""Training HierarchicalTopK SAEs: settings, the jitted step, the loop, checkpoints, and
the run folder's rules (a lock, no overwrites, resume)."""

from hsae_jax.train.config import TrainConfig
from hsae_jax.train.disk import DiskSpaceError
from hsae_jax.train.loop import resume, train
from hsae_jax.train.run_dir import (
    ProcessFailedError,
    RunError,
    RunInUseError,
    TrainingFailedError,
)

__all__ = ["DiskSpaceError", "ProcessFailedError", "RunError", "RunInUseError", "TrainConfig",
           "TrainingFailedError", "resume", "train"]
