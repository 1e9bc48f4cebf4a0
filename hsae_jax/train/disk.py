"""Whether the run folder's disk holds what a run will write, checked before it trains.

A run writes checkpoints of its whole state (parameters, Adam moments, counters; orbax
keeps :data:`KEPT_CHECKPOINTS` and writes the next one beside them before the oldest goes)
and, at the end, the model file (``sae.safetensors``: W_enc and W_dec in float32). With
large dictionaries these are tens to hundreds of GB (F = 2^22, D = 2304 with the
low-memory options: 116 GB a checkpoint, 77 GB the model file); a disk that cannot hold
the final checkpoint and the model would end a long run in an error after training.
:func:`check_disk_space` raises :class:`DiskSpaceError` before the first step if the disk
cannot hold the final checkpoint and the model file, and warns if it cannot hold every
kept checkpoint as well.
"""

from __future__ import annotations

import math
import shutil

import jax

from hsae_jax.train.run_dir import RunError

KEPT_CHECKPOINTS = 2  # hsae_jax.train.checkpoint.Checkpointer's max_to_keep
GB = 1e9


class DiskSpaceError(RunError):
    """The run folder's disk cannot hold the final checkpoint and the model file."""


def state_bytes(abstract_state) -> int:
    """Bytes of every array of a state (shapes and dtypes, e.g. :func:`abstract_state`'s):
    what one checkpoint holds, uncompressed, over all devices and processes."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_state) if hasattr(leaf, "dtype"))


def model_file_bytes(n_latents: int, d_model: int) -> int:
    """Bytes of ``sae.safetensors``: W_enc, W_dec, b_enc and b_dec in float32."""
    return 4 * (2 * n_latents * d_model + n_latents + d_model)


def check_disk_space(out_dir: str, abstract_state, n_latents: int, d_model: int,
                     log=print) -> None:
    """Raises :class:`DiskSpaceError` when the disk of ``out_dir`` has less free space than
    one checkpoint of ``abstract_state`` plus the model file; logs a warning when it has
    less than the kept checkpoints, the one being written and the model file."""
    free = shutil.disk_usage(out_dir).free
    checkpoint = state_bytes(abstract_state)
    model = model_file_bytes(n_latents, d_model)
    if checkpoint + model > free:
        raise DiskSpaceError(
            f"--out {out_dir}: its disk has {free / GB:.1f} GB free, but the run writes a "
            f"checkpoint of {checkpoint / GB:.1f} GB and the model file of {model / GB:.1f} "
            f"GB at the end: free {(checkpoint + model - free) / GB:.1f} GB or more, or "
            "write the run to a larger disk")
    full = (KEPT_CHECKPOINTS + 1) * checkpoint + model
    if full > free:
        log(f"warning: {out_dir}'s disk has {free / GB:.1f} GB free; {KEPT_CHECKPOINTS} kept "
            f"checkpoints, the one being written and the model file take "
            f"{full / GB:.1f} GB: a save may fail once {KEPT_CHECKPOINTS} checkpoints exist")
