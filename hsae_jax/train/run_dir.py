"""The run folder's rules: one writer at a time, never overwritten, resumed as documented.

- A run holds an OS lock on ``RUN/.hsae.lock`` (``fcntl.flock``) for its whole life; the
  OS releases it when the process ends in any way (``kill -9`` included). A second
  process asking for the same folder gets :class:`RunInUseError` naming the holder's pid.
- A new run needs a folder that does not exist or is empty: it never replaces a model,
  checkpoints or records that are already there (``--resume`` continues a run).
- A run that fails before its first checkpoint removes the folder it created: a failed
  start leaves nothing behind.
- ``--resume RUN`` continues with the settings saved in RUN's checkpoint; settings given
  again must repeat the saved values, except :data:`RESUMABLE_CHANGES` (``steps``, not
  below the checkpoint's step; logging, evaluation and saving intervals; the runtime
  backend). Relative data paths are stored resolved, so a run resumes and evaluates from
  any directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

from hsae_jax.train.checkpoint import Checkpointer
from hsae_jax.train.config import TrainConfig

LOCK_NAME = ".hsae.lock"
CHECKPOINTS = "checkpoints"
# settings a resumed run may change; every other one must match the checkpoint's
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "eval_every", "eval_batches", "save_every",
                               "devices", "backend", "deterministic", "max_skipped_fraction",
                               "prefetch", "mesh", "coordinator", "num_processes",
                               "process_id", "encoder_rows", "update_blocks"})


class RunError(RuntimeError):
    """A run could not go on (``hsae train`` exits with status 1)."""


class RunInUseError(RunError):
    """Another process holds the run folder's lock."""


class ProcessFailedError(RunError):
    """Another process of a multi-process run failed to start (its error is named)."""


class TrainingFailedError(RunError):
    """The run ended, its files are kept, but it trained (almost) nothing."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``n_latents`` -> ``--n-latents``."""
    return "--" + name.replace("_", "-")


class RunLock:
    """An exclusive ``flock`` on ``RUN/.hsae.lock`` (the file holds the holder's pid)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"{os.path.dirname(self.path)} is in use by another hsae process (pid "
                f"{holder}): wait for it to end, or write to another folder") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet (None: it exists)."""
    missing = None
    while not os.path.exists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _contents(run_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if n != LOCK_NAME)


def has_checkpoint(run_dir: str) -> bool:
    """True when ``RUN/checkpoints`` holds a finished step (orbax renames a step's
    temporary folder to the bare step number when the step is complete)."""
    directory = os.path.join(run_dir, CHECKPOINTS)
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


class RunFolder:
    """A run folder claimed by this process: locked, checked, cleaned up on failure.

    Use :meth:`claim` as a context manager around the whole run.
    """

    def __init__(self, path: str, created: str | None, lock: RunLock):
        self.path, self.created, self.lock = path, created, lock

    @classmethod
    @contextlib.contextmanager
    def claim(cls, run_dir: str, *, resume: bool):
        """Locks ``run_dir`` for a new run (missing or empty folder) or for ``resume``
        (a folder holding a checkpoint); unlocks on exit. If the run fails before any
        checkpoint is saved, a folder this call created is removed again."""
        path = os.path.abspath(run_dir)
        if resume:
            check_resumable_folder(path)
        elif os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"{run_dir} is a file, not a run folder: choose another "
                                  "output folder")
        created = None if resume else _first_missing(path)
        lock_existed = os.path.exists(os.path.join(path, LOCK_NAME))
        try:
            os.makedirs(path, exist_ok=True)
            lock = RunLock(path).acquire()
        except OSError as err:
            _remove(created)
            raise type(err)(f"cannot write the run folder {path}: "
                            f"{err.strerror or err}") from None
        if not resume and _contents(path):
            if not lock_existed:  # leave the folder as it was: no lock file of ours in it
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
            lock.release()
            raise FileExistsError(_not_empty_message(run_dir, _contents(path)))
        folder = cls(path, created, lock)
        try:
            yield folder
        except BaseException:
            if not resume and not has_checkpoint(path):
                # nothing to resume from: leave the place as it was (still locked)
                if folder.created:
                    _remove(folder.created)
                else:  # empty when claimed: everything in it is this run's
                    for name in _contents(path):
                        _remove_any(os.path.join(path, name))
            raise
        finally:
            folder.lock.release()


def _not_empty_message(run_dir: str, names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    if CHECKPOINTS in names:
        return (f"{run_dir} already holds a run ({shown}): continue it with --resume "
                f"{run_dir}, or choose another output folder")
    return (f"{run_dir} already holds files ({shown}): a new run needs a folder that is "
            "missing or empty; choose another output folder")


def _remove(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _remove_any(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def check_resumable_folder(run_dir: str) -> None:
    """Raises a clear error unless ``run_dir`` is a folder holding a checkpoint."""
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"--resume {run_dir}: no such folder")
    if not os.path.isdir(run_dir):
        raise NotADirectoryError(f"--resume {run_dir}: a file, not a run folder")
    if not has_checkpoint(run_dir):
        raise FileNotFoundError(
            f"--resume {run_dir}: no checkpoint under {os.path.join(run_dir, CHECKPOINTS)} "
            "(the run saved none: it stopped before its first --save-every step)")


def resolve_paths(tc: TrainConfig) -> TrainConfig:
    """``tc`` with its data paths made absolute (the run then works from any directory)."""
    changes = {name: os.path.abspath(getattr(tc, name)) for name in ("data", "eval_data")
               if getattr(tc, name) and not os.path.isabs(getattr(tc, name))}
    return tc.replace(**changes) if changes else tc


def check_resume_settings(saved: dict, tc: TrainConfig, step: int) -> None:
    """Raises ValueError naming every setting of ``tc`` that a run resumed at ``step``
    from a checkpoint saved with ``saved`` (flat) settings may not have."""
    saved_tc = resolve_paths(TrainConfig.from_saved(saved))
    was, now = saved_tc.to_flat(), resolve_paths(tc).to_flat()
    diff = [f"{flag(k)}: saved {was.get(k)!r}, given {v!r}" for k, v in now.items()
            if k not in RESUMABLE_CHANGES and was.get(k) != v]
    if diff:
        allowed = ", ".join(flag(k) for k in sorted(RESUMABLE_CHANGES))
        raise ValueError("--resume: these settings differ from the run's: " + "; ".join(diff)
                         + f" (a resumed run may change only {allowed})")
    if tc.steps < step:
        raise ValueError(f"--steps={tc.steps} is below the checkpoint's step {step}: a "
                         f"resumed run can only go on (--steps >= {step})")


def peek_saved_settings(run_dir: str) -> dict:
    """The flat settings saved with the newest readable checkpoint of ``run_dir``, read
    from orbax's JSON file itself ({} when it cannot tell): opening the checkpoints with
    orbax starts JAX's backend, and what must come before that (XLA's flags,
    :mod:`hsae_jax.xla_determinism`; ``jax.distributed.initialize``) needs a few of them."""
    root = os.path.join(run_dir, "checkpoints")
    try:
        steps = sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True)
    except OSError:
        return {}
    for step in steps:
        try:
            with open(os.path.join(root, str(step), "meta", "metadata")) as f:
                settings = json.load(f)["train_config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(settings, dict):
            return settings
    return {}


def saved_config(run_dir: str) -> tuple[TrainConfig, int]:
    """(settings, step) saved in ``run_dir``'s newest checkpoint whose JSON reads."""
    check_resumable_folder(run_dir)
    ckpt = Checkpointer(run_dir, create=False)
    try:
        step, meta, _ = ckpt.newest_meta()
    finally:
        ckpt.close()
    return TrainConfig.from_saved(meta["train_config"]), step
