"""The run folder's promises (issue 13): one writer at a time, no overwrites, a fallback
to the newest checkpoint that restores, resume rules, clear one-line errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from hsae_jax import HierarchicalTopKSAE
from hsae_jax.cli import main
from hsae_jax.train import RunInUseError, TrainConfig, TrainingFailedError, resume, train
from hsae_jax.train.run_dir import LOCK_NAME, RunLock

SMALL = dict(d_model=8, n_latents=16, k=4, batch_size=32, steps=4, synthetic_features=16,
             synthetic_active=3.0, log_every=1, eval_every=2, save_every=2, eval_batches=1,
             warmup_steps=1, dead_tokens=64)


def flags(**settings) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def quiet(*_):
    pass


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``hsae *argv`` run in this process."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder) -> dict:
    """Every file under ``folder`` (but the lock) with its size and modification time."""
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == LOCK_NAME:
                continue
            path = os.path.join(root, name)
            result[os.path.relpath(path, folder)] = (os.path.getsize(path),
                                                     os.stat(path).st_mtime_ns)
    return result


def strip_timing(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in text.splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run on a .npy file given by a relative path (checkpoints 2 and 4)."""
    home = tmp_path_factory.mktemp("base")
    rows = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    np.save(home / "acts.npy", rows)
    here = os.getcwd()
    os.chdir(home)
    try:
        train(TrainConfig.from_flat(**SMALL, data="acts.npy"), "run", progress=False, log=quiet)
    finally:
        os.chdir(here)
    return home / "run"


def copy_of(base, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(base, target)
    return target


# ------------------------------------------------------------------- paths and eval


def test_data_paths_are_stored_resolved_and_eval_works_from_anywhere(base, tmp_path, capsys,
                                                                      monkeypatch):
    data = str(base.parent / "acts.npy")
    assert json.loads((base / "cfg.json").read_text())["train"]["data"] == data
    monkeypatch.chdir(tmp_path)
    status, out, _ = cli(capsys, "eval", str(base))
    assert status == 0 and data in out


def test_eval_on_a_killed_run_says_to_resume(base, tmp_path, capsys):
    run = copy_of(base, tmp_path)
    os.remove(run / "cfg.json")
    status, _, err = cli(capsys, "eval", str(run))
    assert status == 2
    assert f"hsae train --resume {run}" in error_line(err)


@pytest.mark.parametrize("content, message", [
    ('{"d_model": ', "cfg.json is not valid JSON"),
    ("[1, 2]", "cfg.json holds a JSON list, not an object"),
    ('{"d_model": 8, "n_latents": 16, "k": 4, "train": 3}', "'train' must be an object"),
    ('{"d_model": 8, "n_latents": 16, "k": 0}', "cfg.json: --k=0 must be an int >= 1"),
])
def test_eval_names_a_bad_cfg_json(base, tmp_path, capsys, content, message):
    run = copy_of(base, tmp_path)
    (run / "cfg.json").write_text(content)
    status, _, err = cli(capsys, "eval", str(run))
    assert status == 2 and message in error_line(err)


def test_eval_names_a_truncated_model_file_and_checks_batches(base, tmp_path, capsys):
    run = copy_of(base, tmp_path)
    path = run / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    status, _, err = cli(capsys, "eval", str(run))
    assert status == 2 and f"{path} is not a readable safetensors file" in error_line(err)
    status, _, err = cli(capsys, "eval", str(base), "--batches", "0")
    assert status == 2 and "--batches: must be an int >= 1" in error_line(err)
    status, _, err = cli(capsys, "eval", str(tmp_path / "nothing"))
    assert status == 2 and "does not exist" in error_line(err)


# ------------------------------------------------------------------ resume and fallback


def test_resume_alone_falls_back_past_a_corrupt_checkpoint_and_a_partial_record(
        base, tmp_path, capsys, monkeypatch):
    """`hsae train --resume RUN` with no other flag (from another directory): the saved
    settings, the newest checkpoint that restores, metrics.jsonl's cut-short last line
    trimmed; it ends bit-identical to the uninterrupted run."""
    run = copy_of(base, tmp_path)
    for name in ("sae.safetensors", "cfg.json", "metrics.json"):
        os.remove(run / name)
    state = run / "checkpoints" / "4" / "state"
    for root, _, files in os.walk(state):  # damage every data file of step 4
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(min(os.path.getsize(path), 10))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # a kill in the middle of a record
    monkeypatch.chdir(tmp_path)
    status, out, _ = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert status == 0, out
    assert "checkpoint 4 does not restore, skipped" in out
    assert "resuming" in out and "at step 2" in out
    assert "left out 1 unreadable record(s)" in out
    assert os.listdir(run / "checkpoints-unreadable") == ["4"]
    chex.assert_trees_all_equal(HierarchicalTopKSAE.load(str(run)).params(),
                                HierarchicalTopKSAE.load(str(base)).params())
    assert (strip_timing((run / "metrics.jsonl").read_text())
            == strip_timing((base / "metrics.jsonl").read_text()))


def test_resume_errors_name_the_problem_and_change_nothing(base, tmp_path, capsys):
    run = copy_of(base, tmp_path)
    before = snapshot(run)
    cases = [
        (["--lr", "0.5"], "--lr: saved None, given 0.5"),
        (["--n-latents", "32"], "--n-latents: saved 16, given 32"),
        (["--steps", "1"], "--steps=1 is below the checkpoint's step 4"),
        (["--out", str(tmp_path / "fork")], "continues that run in its own folder"),
    ]
    for extra, message in cases:
        status, _, err = cli(capsys, "train", "--resume", str(run), "--no-progress", *extra)
        assert status == 2 and message in error_line(err), (extra, err)
    assert snapshot(run) == before
    assert not (tmp_path / "fork").exists()

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    for target, message in ((tmp_path / "missing", "no such folder"),
                            (tmp_path / "a_file", "a file, not a run folder"),
                            (tmp_path / "empty", "no checkpoint under")):
        status, _, err = cli(capsys, "train", "--resume", str(target))
        assert status == 2 and message in error_line(err)
    assert not (tmp_path / "missing").exists() and os.listdir(tmp_path / "empty") == []


def test_no_checkpoint_restores(base, tmp_path, capsys):
    run = copy_of(base, tmp_path)
    for step in ("2", "4"):
        (run / "checkpoints" / step / "meta" / "metadata").write_text("{not json")
    before = snapshot(run)
    status, _, err = cli(capsys, "train", "--resume", str(run))
    assert status == 2
    line = error_line(err)
    assert "restores" in line and "step 4:" in line and "step 2:" in line
    assert snapshot(run) == before


# --------------------------------------------------------------- new runs, overwrites


def test_a_new_run_never_replaces_what_a_folder_holds(base, tmp_path, capsys):
    run = copy_of(base, tmp_path)
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for name in ("sae.safetensors", "cfg.json"):
        shutil.copy(base / name, model_only / name)
    for folder, message in ((run, f"continue it with --resume {run}"),
                            (model_only, "already holds files (cfg.json, sae.safetensors)")):
        before = snapshot(folder)
        status, _, err = cli(capsys, "train", "--out", str(folder), *flags(**SMALL))
        assert status == 2 and message in error_line(err)
        assert snapshot(folder) == before
    assert not (model_only / LOCK_NAME).exists()  # the refused folder gets no lock file


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((64, 8), np.float32))
    status, _, err = cli(capsys, "train", "--out", str(tmp_path / "a" / "b"),
                         "--data", str(zeros), *flags(**SMALL))
    assert status == 2 and "is all zeros" in error_line(err)
    assert not (tmp_path / "a").exists()

    class Broken:
        d_model = 8

        def batch(self, step):
            raise OSError(errno.EIO, "Input/output error", "the data")

        def describe(self):
            return "broken"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="Input/output error"):
        train(TrainConfig.from_flat(**SMALL), str(empty), source=Broken(), progress=False,
              log=quiet)
    assert os.listdir(empty) == [LOCK_NAME] or os.listdir(empty) == []
    RunLock(str(empty)).acquire().release()  # released


def test_an_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:  # root writes anywhere: make the lock file's creation fail as it would
        real_open = os.open

        def read_only(path, flags, *args):
            if str(path).startswith(str(folder)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", read_only)
    try:
        status, _, err = cli(capsys, "train", "--out", str(folder / "run"), *flags(**SMALL))
        assert status == 2
        assert f"cannot write the run folder {folder / 'run'}" in error_line(err)
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- locking


def test_the_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    RunLock(str(tmp_path)).acquire().release()


def test_two_processes_never_share_a_run_folder(tmp_path):
    """A long run holds the folder; a second `hsae train --out` on it fails at once with
    one line naming the holder. Ctrl-C then stops the first one (a checkpoint being
    written is finished first) and frees the folder."""
    out = tmp_path / "run"
    settings = flags(**{**SMALL, "steps": 10**6, "save_every": 5, "eval_every": 10**6,
                        "log_every": 10**6})
    hsae = os.path.join(os.path.dirname(sys.executable), "hsae")
    # started with SIGINT at its default whatever this process inherited (a shell that
    # starts a command with `&` hands it SIGINT ignored, and children keep that across
    # exec: Ctrl-C could not reach the run); PYTHONFAULTHANDLER: a first run that does not
    # stop is made to print where its threads are (SIGABRT) before the test fails
    interruptible = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "os.execv(sys.argv[1], sys.argv[1:])")
    first = subprocess.Popen([sys.executable, "-c", interruptible, hsae, "train",
                              "--no-progress", "--out", str(out), *settings],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        lock_file = out / LOCK_NAME
        deadline = time.time() + 240
        while not (lock_file.exists() and lock_file.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "hsae_jax.cli", "train", "--no-progress", "--out", str(out),
             *settings], capture_output=True, text=True, timeout=240)
        assert second.returncode == 1
        assert error_line(second.stderr) == (
            f"hsae train: error: {out} is in use by another hsae process (pid {first.pid}): "
            "wait for it to end, or write to another folder")
        while not any(n.isdigit() for n in os.listdir(out / "checkpoints")):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.send_signal(signal.SIGABRT)
            first.wait()
            pytest.fail("the first run did not stop within 120 s of SIGINT; its threads:\n"
                        + first.stderr.read()[-6000:])
        assert first.returncode == 130
        assert first.stderr.read() == "hsae train: interrupted\n"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    RunLock(str(out)).acquire().release()


# ------------------------------------------------------------- runs that train nothing


def test_a_run_whose_every_step_is_skipped_fails_and_keeps_its_files(tmp_path):
    """Every batch holds one NaN row: the input scale comes from the other rows, every
    update is skipped, the run writes its files and fails instead of saying done."""
    inner = TrainConfig.from_flat(**SMALL).open_source()

    class Poisoned:  # one NaN row in every batch
        d_model = inner.d_model
        describe = inner.describe

        def batch(self, step):
            return inner.batch(step).at[3, 0].set(np.nan)

    lines = []
    with pytest.raises(TrainingFailedError, match="no step was applied: all 4 were skipped"):
        train(TrainConfig.from_flat(**SMALL), str(tmp_path / "run"), source=Poisoned(),
              progress=False, log=lines.append)
    assert any("from 31 of the first batch's 32 rows" in line for line in lines)
    assert not any(line.startswith("done") for line in lines)
    for name in ("sae.safetensors", "cfg.json", "metrics.jsonl", "checkpoints"):
        assert (tmp_path / "run" / name).exists(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 4 and "no step was applied" in metrics["failure"]
    scale = json.loads((tmp_path / "run" / "cfg.json").read_text())["input_scale"]
    assert np.isfinite(scale) and scale > 0


def test_nan_rows_in_a_data_file_stop_the_run_naming_them(tmp_path, capsys):
    rows = np.random.default_rng(1).normal(size=(256, 8)).astype(np.float32)
    rows[200, 3] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    status, out, err = cli(capsys, "train", "--no-progress", "--out", str(tmp_path / "run"),
                           "--data", str(tmp_path / "nan.npy"), *flags(**{**SMALL, "steps": 24}))
    assert status == 2
    assert "hold NaN or inf" in err and "nan.npy row 200" in err
    assert "done" not in out


def test_too_many_skipped_steps_fail_and_the_final_line_counts_them(tmp_path):
    inner = TrainConfig.from_flat(**SMALL).open_source()

    class HalfPoisoned:  # training steps 1 and 3 see a NaN; evaluation (batch 0) does not
        d_model = inner.d_model
        describe = inner.describe

        def batch(self, step):
            x = inner.batch(step)
            return x.at[0, 0].set(np.nan) if step % 2 else x

    run = tmp_path / "run"
    with pytest.raises(TrainingFailedError, match="2 of 4 steps were skipped .* more than "
                       "--max-skipped-fraction=0.1"):
        train(TrainConfig.from_flat(**SMALL), str(run), source=HalfPoisoned(), progress=False,
              log=quiet)
    assert json.loads((run / "metrics.json").read_text())["skipped_steps"] == 2
    lines = []
    summary = resume(str(run), source=HalfPoisoned(), progress=False, log=lines.append,
                     max_skipped_fraction=0.5)
    assert summary["skipped_steps"] == 2 and "failure" not in summary
    assert "2 of 4 steps skipped" in lines[-1] and lines[-1].startswith("done")
