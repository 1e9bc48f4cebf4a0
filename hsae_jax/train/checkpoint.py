"""Training-state checkpoints: orbax, written in the background, the last few kept.

A save blocks only while the state is copied off the device (the step donates its
buffers, so the copy must be made before the next step); orbax writes the files on a
background thread while training goes on, and the next save, :meth:`Checkpointer.wait`
or :meth:`Checkpointer.close` waits for it and raises its error if it failed. Orbax
writes each checkpoint into a temporary directory and renames it when complete, so a
run killed at any moment leaves the previous checkpoint loadable and a partial one is
never picked up. A complete checkpoint that no longer reads (a damaged disk, a
file truncated by hand) is skipped: :meth:`Checkpointer.restore_newest` falls back to
the newest one that restores and says which were skipped and why;
:meth:`Checkpointer.set_aside` moves those out of the way (never deletes them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading

import orbax.checkpoint as ocp

UNREADABLE = "checkpoints-unreadable"


def _reason(err: BaseException) -> str:
    """One short line saying why a checkpoint did not restore."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds back SIGINT (Ctrl-C) until the block ends, then delivers it: an interrupted
    save would leave orbax's writer threads behind (and a traceback at exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        # None: the handler was not installed from Python (it cannot be put back)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if received and callable(previous):
            previous(*received[0])  # Python's default handler raises KeyboardInterrupt
        elif received and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the complete checkpoints in ``run_dir/checkpoints`` (orbax's listing),
    newest first; read without a CheckpointManager, whose creation waits for every process
    of a run at a barrier."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory), reverse=True)


class Checkpointer:
    """``background``: saves return once the state is off the device (False: once the
    files are written)."""

    def __init__(self, run_dir: str, max_to_keep: int = 2, create: bool = True,
                 background: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                 enable_async_checkpointing=background),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Saves ``step``: waits for the previous save (raising its error), copies
        ``state`` off the device and returns while the files are written in the
        background. A Ctrl-C meanwhile lets the copy finish first."""
        with _interrupts_deferred():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        """Waits until the last save is written (raising its error, if it failed); a
        Ctrl-C meanwhile lets it finish first."""
        with _interrupts_deferred():
            self.manager.wait_until_finished()

    def meta(self, step: int | None = None) -> dict:
        """The JSON saved beside the state of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: dict, step: int | None = None):
        """(state, meta) of ``step`` (default: the latest complete checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def steps(self) -> list[int]:
        """Every complete checkpoint's step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def newest_meta(self) -> tuple[int, dict, list[tuple[int, str]]]:
        """(step, meta, skipped) of the newest checkpoint whose JSON reads; ``skipped``
        lists (step, reason) of newer ones that did not."""
        skipped = []
        for step in self.steps():
            try:
                return step, self.meta(step), skipped
            except Exception as err:  # noqa: BLE001 - any failure: try the older one
                skipped.append((step, _reason(err)))
        raise self._none_restores(skipped)

    def restore_newest(self, abstract_state: dict, below: int | None = None
                       ) -> tuple[dict, dict, int, list[tuple[int, str]]]:
        """(state, meta, step, skipped): the newest checkpoint (at or below ``below``)
        that restores; ``skipped`` lists (step, reason) of newer ones that did not."""
        skipped = []
        for step in self.steps():
            if below is not None and step > below:
                continue
            try:
                state, meta = self.restore(abstract_state, step)
            except Exception as err:  # noqa: BLE001 - any failure: try the older one
                skipped.append((step, _reason(err)))
                continue
            return state, meta, step, skipped
        raise self._none_restores(skipped)

    def _none_restores(self, skipped) -> Exception:
        if not skipped:
            return FileNotFoundError(f"no complete checkpoint under {self.directory}")
        return ValueError(f"no checkpoint under {self.directory} restores: "
                          + "; ".join(f"step {s}: {why}" for s, why in skipped))

    def set_aside(self, steps) -> str | None:
        """Moves the checkpoints of ``steps`` to ``RUN/checkpoints-unreadable/`` (so a
        later save of the same step can happen); returns that folder (None: nothing)."""
        if not steps:
            return None
        target = os.path.join(os.path.dirname(self.directory), UNREADABLE)
        os.makedirs(target, exist_ok=True)
        for step in steps:
            name, n = str(step), 1
            while os.path.exists(os.path.join(target, name)):
                name, n = f"{step}.{n}", n + 1
            shutil.move(os.path.join(self.directory, str(step)), os.path.join(target, name))
        self.manager.reload()
        return target

    def close(self) -> None:
        """Waits for the last save (raising its error, if it failed) and closes."""
        try:
            self.wait()
        finally:
            self.manager.close()
