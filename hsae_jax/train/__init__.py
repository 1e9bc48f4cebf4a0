"""Training HierarchicalTopK SAEs: settings, the jitted step, the loop, checkpoints, and
the run folder's rules (a lock, no overwrites, resume)."""

from hsae_jax.train.config import TrainConfig
from hsae_jax.train.loop import resume, train
from hsae_jax.train.run_dir import RunError, RunInUseError, TrainingFailedError

__all__ = ["RunError", "RunInUseError", "TrainConfig", "TrainingFailedError", "resume", "train"]
