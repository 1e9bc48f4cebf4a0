"""``train``: the loop around the jitted step, with progress, evaluation and checkpoints.

A run folder holds:
- ``sae.safetensors`` + ``cfg.json``: the trained model (:meth:`HierarchicalTopKSAE.load`);
- ``metrics.json``: the final evaluation (``fvu_per_k``, ``fvu``, ``mse``, ``l0``,
  ``dead_fraction``, ...); ``metrics.jsonl``: one record per log / evaluation step;
- ``fvu_vs_k.png``, ``loss.png``;
- ``checkpoints/``: the training state (params, optimizer state, counters, step) for
  ``--resume``. Data order and initialisation follow from the seed and the step, so a
  resumed run ends with the same parameters as an uninterrupted one.

The folder's rules (a lock, no overwrites, resume rules) are in :mod:`run_dir`. A run
whose updates were (almost) all skipped as non-finite, or whose final FVU is not
finite, writes its files and then raises :class:`TrainingFailedError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import NamedTuple

import jax

from hsae_jax import xla_determinism
from hsae_jax.data import eval_batches
from hsae_jax.data.loader import Prefetcher
from hsae_jax.io_utils import atomic_write, atomic_write_json
from hsae_jax.model import finite_rows, save_model_files
from hsae_jax.parallel import MeshShape, distributed, make_layout
from hsae_jax.parallel.evaluate import evaluate_sharded
from hsae_jax.parallel.state import abstract_state, host_arrays, init_state
from hsae_jax.plots import plot_fvu_vs_k, plot_training_curves
from hsae_jax.train.auxk_buckets import AuxKBuckets
from hsae_jax.train.checkpoint import Checkpointer, checkpoint_steps
from hsae_jax.train.config import TrainConfig
from hsae_jax.train.disk import check_disk_space
from hsae_jax.train.run_dir import (
    RESUMABLE_CHANGES,
    ProcessFailedError,
    RunFolder,
    TrainingFailedError,
    check_resume_settings,
    flag,
    peek_saved_settings,
    resolve_paths,
    saved_config,
)
from hsae_jax.train.step import (
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)

# a batch's NaN / inf check is read this many steps after the step that took it (its update
# skipped) or before the next log, evaluation or checkpoint, whichever comes first: no step
# waits for the device to convert its batch (the loader's Prefetcher.check_lag)
CHECK_LAG = 2

__all__ = ["RESUMABLE_CHANGES", "read_records", "resume", "train"]


def read_records(path: str, upto_step: int, log=None) -> list[dict]:
    """The records of ``metrics.jsonl`` up to and including ``upto_step``.

    A line that does not parse (a record cut short when the process was killed while
    writing it) is left out; ``log`` is told.
    """
    if not os.path.exists(path):
        return []
    records, bad = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad.append(number)
    if bad and log is not None:
        log(f"{path}: left out {len(bad)} unreadable record(s) (line {', '.join(map(str, bad))};"
            " a record cut short by a kill)")
    return [r for r in records if r["step"] <= upto_step]


def _write_records(path: str, records: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    atomic_write(path, write)


class _Records:
    """metrics.jsonl and the progress bar: what a run reports while it trains."""

    def __init__(self, path: str, tc: TrainConfig, schedule, start: int, progress: bool):
        self.path, self.tc, self.schedule = path, tc, schedule
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
        self.last_eval: dict = {}
        self.started = self.last_time = time.perf_counter()
        self.last_step = start

    def evaluation(self, step: int, metrics: dict) -> None:
        self.last_eval = metrics
        self.file.write(json.dumps({"step": step, "eval": metrics}) + "\n")

    def training(self, step: int, metrics) -> None:
        """One record of the step's metrics and the throughput since the last record."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        # throughput over this log interval (the first one includes compilation)
        rate = (step - self.last_step) * self.tc.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, step
        self.file.write(json.dumps({"step": step, **m, "lr": float(self.schedule(step - 1)),
                                    "tokens_per_s": rate, "elapsed_s": now - self.started})
                        + "\n")
        self.file.flush()
        if self.bar is not None:
            fvu = self.last_eval.get("fvu", float("nan"))
            self.bar.set_postfix(loss=f"{m['loss']:.4g}", fvu=f"{fvu:.3f}", l0=f"{m['l0']:.1f}",
                                 dead=f"{m['dead_fraction']:.2f}",
                                 skipped=int(m["skipped_steps"]), refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()


def _init_or_restore(tc: TrainConfig, cfg, tx, source, ckpt: Checkpointer, jsonl: str,
                     resume: bool, out_dir: str, log, layout, abstract) -> tuple[dict, int, dict]:
    """(state, first step, checkpoint meta ({} for a fresh state)) laid out on ``layout``'s
    mesh: a fresh state, or the one in the newest checkpoint that restores (newer ones that
    do not are named, skipped and set aside), whatever mesh it was saved from.
    ``abstract``: the state's shapes and this mesh's shardings (:func:`abstract_state`)."""
    if resume:
        # the settings first: a checkpoint of other shapes would not restore anyway
        _, meta, _ = ckpt.newest_meta()
        check_resume_settings(meta["train_config"], tc, 0)
        # shapes and this mesh's shardings only: each device reads its own blocks
        state, meta, start, skipped = ckpt.restore_newest(abstract)
        check_resume_settings(meta["train_config"], tc, start)
        for step, why in skipped:
            log(f"checkpoint {step} does not restore, skipped: {why}")
        moved = ckpt.set_aside([step for step, _ in skipped])
        if moved:
            log(f"moved the checkpoint(s) that do not restore to {moved}")
        log(f"resuming {out_dir} at step {start}")
        _write_records(jsonl, read_records(jsonl, start, log))  # drop records past the checkpoint
        return state, start, meta
    sample = source.batch(0)
    used = finite_rows(sample, f"the first batch of the data ({source.describe()})")
    if used < sample.shape[0]:
        log(f"input scale and b_dec from {used} of the first batch's {sample.shape[0]} rows "
            "(rows with NaN or inf left out)")
    _write_records(jsonl, [])
    return init_state(layout, cfg, tx, tc.seed, sample, tc.param_dtype), 0, {}


def train(tc: TrainConfig, out_dir: str, *, resume: bool = False, source=None,
          progress: bool = True, log=print) -> dict:
    """Trains an SAE as ``tc`` says, writing the run folder ``out_dir``; returns metrics.json.

    ``source`` (anything with ``batch(step) -> [batch_size, D]``, ``d_model`` and
    ``describe()``) replaces the data ``tc`` names. ``out_dir`` must be missing or empty;
    with ``resume``, continues from the newest checkpoint in ``out_dir`` that restores
    (``tc`` may differ from the saved settings only in ``RESUMABLE_CHANGES``; see
    :func:`resume` to continue with the saved settings). The folder is locked for the
    run's life (:class:`RunInUseError` if another process has it). With several processes,
    one that cannot start (the folder, its disk, its data) stops them all before the first
    barrier: the others raise :class:`ProcessFailedError` naming it and its error. Raises
    :class:`TrainingFailedError` (after writing the run's files) when too many updates
    were skipped as non-finite (``tc.max_skipped_fraction``) or the final FVU is not
    finite.
    """
    if tc.deterministic:  # before anything starts JAX's backend
        xla_determinism.request(log)
    tc = resolve_paths(tc)
    distributed.initialize(tc.coordinator, tc.num_processes, tc.process_id)
    primary = distributed.is_primary()  # process 0 owns the folder and its files
    with contextlib.ExitStack() as claimed:
        try:
            source = source or tc.open_source()
            if primary:
                claimed.enter_context(RunFolder.claim(out_dir, resume=resume))
            run = _set_up(tc, out_dir, source, primary)
        except BaseException as err:  # Ctrl-C too: the others must hear of it
            _go_on_together(err, "could not start")
            raise
        _go_on_together(None, "could not start")
        if not primary:  # trains, but writes nothing in the run folder
            return _train(tc, run, out_dir, resume, False, lambda *_: None, primary=False)
        return _train(tc, run, out_dir, resume, progress, log, primary=True)


def resume(run_dir: str, *, source=None, progress: bool = True, log=print,
           **changes) -> dict:
    """Continues the run in ``run_dir`` with its saved settings; ``changes`` (flat
    settings) may repeat saved values or change those in ``RESUMABLE_CHANGES``
    (``steps`` not below the checkpoint's step)."""
    # before orbax (saved_config) starts JAX's backend: XLA's flags, the processes joined
    early = {**peek_saved_settings(run_dir), **{k: v for k, v in changes.items()
                                                 if v is not None}}
    if early.get("deterministic"):
        xla_determinism.request(log)
    distributed.initialize(early.get("coordinator"), early.get("num_processes"),
                           early.get("process_id"))
    saved, step = saved_config(run_dir)
    if isinstance(changes.get("steps"), int) and changes["steps"] < step:
        raise ValueError(f"--steps={changes['steps']} is below the checkpoint's step {step}: "
                         f"a resumed run can only go on (--steps >= {step})")
    tc = saved.replace(**changes)
    return train(tc, run_dir, resume=True, source=source, progress=progress, log=log)


class _SetUp(NamedTuple):
    """What a run is made of, before anything is written or any process waits on another."""

    cfg: object  # the SAEConfig, d_model from the source
    kernels: object
    layout: object
    source: object
    tx: object
    step_fn: object
    abstract: dict  # the state's shapes and this mesh's shardings
    held_out: list  # the evaluation batches


def _set_up(tc: TrainConfig, out_dir: str, source, primary: bool) -> _SetUp:
    """The run's model, mesh, optimizer, (not compiled) step and evaluation batches; on
    process 0, the check that the disk of ``out_dir`` holds what the run will write."""
    cfg = dataclasses.replace(tc.sae, d_model=source.d_model)
    kernels = tc.kernels()
    layout = make_layout(MeshShape.parse(tc.mesh), tc.devices)
    layout.check(cfg, tc.batch_size)
    if hasattr(source, "placed") and jax.process_count() == 1:
        source = source.placed(layout.batch_sharding)  # each device makes its own rows
    tx = make_optimizer(tc, layout)
    # made (not compiled) before anything is written: it checks the update's blocks too
    step_fn = make_train_step(cfg, tx, layout, kernels, update=tc.row_blocks())
    abstract = abstract_state(layout, cfg, tx, tc.param_dtype)  # shapes and shardings only
    if primary:  # the run folder is process 0's (other processes may not see it yet)
        check_disk_space(out_dir, abstract, cfg.n_latents, cfg.d_model, tc.steps,
                         tc.save_every, saved=checkpoint_steps(out_dir))
    held_out = eval_batches(source, tc.eval_batches)  # NaN / inf in them is named here
    return _SetUp(cfg, kernels, layout, source, tx, step_fn, abstract, held_out)


def _go_on_together(failure: BaseException | None, what: str) -> None:
    """Every process's outcome, exchanged (``distributed.failures``) where all of them
    are: after start-up (``what``: "could not start"), at the steps that log or save.
    Raises ProcessFailedError, naming the process and its error, in the processes that
    did not fail when another did; a process that failed goes on to raise its own error."""
    try:
        others = distributed.failures(failure)
    except Exception:
        if failure is not None:  # the exchange failed too: the process's own error counts
            return
        raise
    if failure is None and others:
        index, text = others[0]
        more = f" (and {len(others) - 1} other process(es))" if len(others) > 1 else ""
        raise ProcessFailedError(f"process {index} of {jax.process_count()} {what}{more}; "
                                 f"every process stops: {text}")


def _train(tc: TrainConfig, run: _SetUp, out_dir: str, resume: bool, progress: bool, log, *,
           primary: bool) -> dict:
    """:func:`train`'s body, once every process has started (``out_dir`` claimed by
    process 0)."""
    cfg, kernels, layout, source, tx, step_fn, abstract, held_out = run
    ckpt = Checkpointer(out_dir)
    # other processes keep their records in a scratch folder: the run folder's are process 0's
    scratch = None if primary else tempfile.mkdtemp(prefix="hsae-records-")
    jsonl = os.path.join(scratch or out_dir, "metrics.jsonl")
    try:
        state, start, meta = _init_or_restore(tc, cfg, tx, source, ckpt, jsonl, resume,
                                              out_dir, log, layout, abstract)
        auxk = AuxKBuckets(cfg, layout.axes, tc.batch_size,
                           host_arrays(state["stats"])["tokens_since_fired"], start,
                           meta.get("auxk_bound"), log)
    except BaseException:
        ckpt.close()
        raise
    true_features = getattr(source, "features", None)
    log(f"training {cfg.objective} SAE D={cfg.d_model} F={cfg.n_latents} K={cfg.k} on "
        f"{source.describe()}; batch {tc.batch_size} x {tc.steps} steps on "
        f"{layout.describe()}, backend {kernels.backend}")

    def evaluate_state(params, stats):
        return evaluate_sharded(cfg, layout, params, stats, held_out, true_features,
                                kernels=kernels)

    records = _Records(jsonl, tc, learning_rate_schedule(tc), start, progress)
    share, shares = layout.process_rows(tc.batch_size)  # this process reads its rows only
    # with several processes, a batch with NaN / inf (or NaN rows for one that could not be
    # read) goes through the step, its update skipped on every device, and its error is
    # raised where all processes check
    several = jax.process_count() > 1
    batches = Prefetcher(source, range(start, tc.steps),
                         lambda x: layout.put_batch(x, tc.batch_size), depth=tc.prefetch,
                         process_index=share, process_count=shares, defer_errors=several,
                         check_lag=CHECK_LAG)
    try:
        for step, x in batches:
            *values, metrics = step_fn(state["params"], state["stats"], state["opt_state"], x,
                                       auxk_bucket=auxk.bucket(step))
            metrics = auxk.record(step, metrics)
            state = dict(zip(("params", "stats", "opt_state"), values, strict=True))
            done = step + 1
            final = done == tc.steps
            saves = done % tc.save_every == 0 or final
            if saves or done % tc.log_every == 0 or done % tc.eval_every == 0:
                batches.check_all()  # nothing is logged or kept after a batch with NaN / inf
            if several and (done % tc.log_every == 0 or saves):
                failure = batches.deferred[0] if batches.deferred else None
                _go_on_together(failure, f"stopped at step {done}")
                if failure is not None:
                    raise failure
            if done % tc.eval_every == 0 or final:
                records.evaluation(done, evaluate_state(state["params"], state["stats"]))
            if done % tc.log_every == 0 or final:
                records.training(done, metrics)
            records.advance()
            if saves:
                records.flush()
                ckpt.save(done, state, {"step": done, "train_config": tc.to_flat(),
                                        "skipped_steps": int(state["opt_state"].total_notfinite),
                                        "auxk_bound": auxk.saved(done)})
    finally:
        batches.close()
        records.close()
        ckpt.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    last_eval = records.last_eval or evaluate_state(state["params"], state["stats"])
    # with several processes the blocks are gathered (every process takes part)
    state = {**state, "params": host_arrays(state["params"]),
             "stats": host_arrays(state["stats"])}
    if not primary:
        return {**last_eval, "steps": tc.steps,
                "skipped_steps": int(state["opt_state"].total_notfinite)}
    return _finish(tc, cfg, state, last_eval, source, out_dir, jsonl, log)


def _finish(tc: TrainConfig, cfg, state, last_eval: dict, source, out_dir: str, jsonl: str,
            log) -> dict:
    """Writes the model, metrics.json and the plots; returns metrics.json's contents.

    Raises TrainingFailedError after writing when the run trained (almost) nothing."""
    skipped = int(state["opt_state"].total_notfinite)
    summary = {**last_eval, "steps": tc.steps, "skipped_steps": skipped}
    failure = _failure(tc, summary)
    if failure:
        summary["failure"] = failure
    data = {"source": source.describe(), **(source.split() if hasattr(source, "split") else {})}
    save_model_files(out_dir, cfg, state["params"], state["stats"],
                     {"train": tc.to_flat(), "data": data})
    atomic_write_json(os.path.join(out_dir, "metrics.json"), summary)
    plot_fvu_vs_k({f"{cfg.objective} K={cfg.k}": summary["fvu_per_k"]},
                  os.path.join(out_dir, "fvu_vs_k.png"))
    plot_training_curves(read_records(jsonl, tc.steps), os.path.join(out_dir, "loss.png"))
    if failure:
        raise TrainingFailedError(f"{failure}; the run's files are kept in {out_dir} "
                                  "(metrics.jsonl and loss.png show when it went wrong)")
    log(f"done: FVU at K {summary['fvu']:.4f}, L0 {summary['l0']:.2f}, dead "
        f"{summary['dead_fraction']:.3f}; {skipped} of {tc.steps} steps skipped "
        f"(non-finite loss or gradient); wrote {out_dir}")
    return summary


def _failure(tc: TrainConfig, summary: dict) -> str | None:
    """Why a finished run counts as failed (None: it did not)."""
    skipped, steps = summary["skipped_steps"], summary["steps"]
    why = ("non-finite loss or gradients: NaN or inf in the data, or a learning rate too "
           "large")
    if skipped >= steps:
        return f"no step was applied: all {steps} were skipped ({why})"
    if skipped > tc.max_skipped_fraction * steps:
        return (f"{skipped} of {steps} steps were skipped ({why}), more than "
                f"{flag('max_skipped_fraction')}={tc.max_skipped_fraction:g}")
    if not math.isfinite(summary["fvu"]):
        return (f"the final evaluation's FVU is {summary['fvu']} (evaluation data with NaN "
                "or inf, or with zero variance)")
    return None
