"""What a run asks of its machine. Before it trains it checks that its folder's disk holds
what it will add: its checkpoints (the state's bytes each; two kept, the next written
beside them) and the model file, from the saves still to come (an error, exit status 1,
before any step). ``hsae train`` lets XLA use 95% of each GPU's memory
unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from hsae_jax.cli import main
from hsae_jax.model import save_model_files
from hsae_jax.parallel import make_layout
from hsae_jax.parallel.state import abstract_state, init_state
from hsae_jax.train import DiskSpaceError, TrainConfig, disk, loop, resume, train
from hsae_jax.train.step import make_optimizer

SMALL = dict(d_model=8, n_latents=16, k=4, batch_size=32, steps=2, synthetic_features=16,
             synthetic_active=3.0, log_every=1, eval_every=2, save_every=2, eval_batches=1,
             warmup_steps=1)


def sizes(tc: TrainConfig) -> tuple[int, int]:
    """(one checkpoint's bytes, the model file's bytes) of ``tc``'s run."""
    layout = make_layout("data=1,model=1", 1)
    state = abstract_state(layout, tc.sae, make_optimizer(tc, layout), tc.param_dtype)
    return (disk.state_bytes(state),
            disk.model_file_bytes(tc.sae.n_latents, tc.sae.d_model))


def free_space(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(disk.shutil, "disk_usage",
                        lambda path: usage._replace(free=free))


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(folder) for name in files)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_a_checkpoint_is_the_state_s_bytes(param_dtype):
    """state_bytes of the state's shapes equals the bytes of a real state's arrays."""
    tc = TrainConfig.from_flat(**SMALL, param_dtype=param_dtype, adam_dtype=param_dtype,
                               compute_dtype=param_dtype)
    layout = make_layout("data=1,model=1", 1)
    tx = make_optimizer(tc, layout)
    state = init_state(layout, tc.sae, tx, 0, np.ones((4, 8), np.float32), param_dtype)
    real = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert disk.state_bytes(abstract_state(layout, tc.sae, tx, param_dtype)) == real


def test_the_model_file_size_is_predicted(tmp_path):
    """model_file_bytes is sae.safetensors' size less its header (under 1 KB here)."""
    tc = TrainConfig.from_flat(**SMALL)
    rng = np.random.default_rng(0)
    f, d = tc.sae.n_latents, tc.sae.d_model
    params = {"W_enc": rng.normal(size=(f, d)), "b_enc": rng.normal(size=f),
              "W_dec": rng.normal(size=(f, d)), "b_dec": rng.normal(size=d)}
    save_model_files(str(tmp_path), tc.sae, params, {"input_scale": 1.0})
    written = os.path.getsize(tmp_path / "sae.safetensors")
    predicted = disk.model_file_bytes(f, d)
    assert predicted <= written < predicted + 1024


@pytest.mark.parametrize("start, steps, save_every, saves", [
    (0, 2000, 500, 4), (0, 2001, 500, 5), (0, 10, 500, 1), (1500, 2000, 500, 1),
    (1000, 2600, 500, 4), (2000, 2000, 500, 0)])
def test_the_saves_to_come_are_every_save_every_and_the_last_step(start, steps, save_every,
                                                                   saves):
    assert disk.saves_to_come(start, steps, save_every) == saves


@pytest.mark.parametrize("existing, saves, need", [
    (0, 1, lambda c, m: c + m),  # one save, then the model file
    # two kept and the next beside them; then two kept and the model file
    (0, 4, lambda c, m: max(3 * c, 2 * c + m)),
    (2, 1, lambda c, m: max(c, m)),  # resumed: one beside the kept two, the oldest goes
    (1, 3, lambda c, m: max(2 * c, c + m)),
    (2, 0, lambda c, m: m)], ids=["new-1", "new-4", "resumed-2+1", "resumed-1+3", "done"])
@pytest.mark.parametrize("c, m", [(100, 30), (30, 100)])
def test_what_a_run_adds_to_its_folder(existing, saves, need, c, m):
    assert disk.bytes_to_come(c, m, existing, saves) == need(c, m)


def test_a_disk_without_room_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    """4 saves: 3 checkpoints at once on the disk, then 2 and the model file."""
    tc = TrainConfig.from_flat(**{**SMALL, "steps": 4, "save_every": 1})
    checkpoint, model = sizes(tc)
    free_space(monkeypatch, max(3 * checkpoint, 2 * checkpoint + model) - 1)

    def not_reached(*_, **__):
        raise AssertionError("the state was made before the disk was checked")

    monkeypatch.setattr(loop, "init_state", not_reached)
    out = tmp_path / "run"
    with pytest.raises(DiskSpaceError, match=r"--out .*run: its disk has .* GB free, but the "
                       r"run adds .* GB: checkpoints of .* GB \(4 to write, 2 kept"):
        train(tc, str(out), progress=False, log=lambda *_: None)


def test_the_cli_says_so_in_one_line_with_status_1(tmp_path, monkeypatch, capsys):
    tc = TrainConfig.from_flat(**SMALL)
    checkpoint, model = sizes(tc)
    free_space(monkeypatch, checkpoint + model - 1)
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert len(err.strip().splitlines()) == 1 and "GB free" in err and "Traceback" not in err


def test_exactly_enough_room_trains_and_a_resume_needs_only_what_it_adds(tmp_path,
                                                                         monkeypatch):
    """A run given exactly what it adds trains (its folder then holds no more than that,
    but for its logs and plots), and resuming it for two more steps needs one checkpoint or
    the model file, not both."""
    tc = TrainConfig.from_flat(**{**SMALL, "steps": 4, "save_every": 1, "n_latents": 4096,
                                  "d_model": 64, "synthetic_features": 64})
    checkpoint, model = sizes(tc)
    need = max(3 * checkpoint, 2 * checkpoint + model)
    free_space(monkeypatch, need)
    out = tmp_path / "run"
    assert train(tc, str(out), progress=False, log=lambda *_: None)["steps"] == 4
    small_files = sum(os.path.getsize(out / name) for name in
                      ("metrics.jsonl", "metrics.json", "cfg.json", "loss.png", "fvu_vs_k.png"))
    assert folder_bytes(out) - small_files <= need
    free_space(monkeypatch, max(checkpoint, model))
    assert resume(str(out), steps=6, progress=False, log=lambda *_: None)["steps"] == 6
    free_space(monkeypatch, max(checkpoint, model) - 1)
    with pytest.raises(DiskSpaceError):
        resume(str(out), steps=8, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("user_values", [(None, None), ("0.5", "true")])
def test_hsae_train_lets_xla_use_95_percent_of_a_gpu_as_needed_unless_told(
        tmp_path, monkeypatch, user_values):
    """The settings ``hsae train`` leaves for XLA's GPU allocator (read when JAX starts its
    backend, which in this test process has already happened: the subprocess test below
    checks the order)."""
    names = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")
    for name, value in zip(names, user_values, strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    try:
        assert main(argv) == 0
        assert [os.environ[n] for n in names] == [user_values[0] or "0.95",
                                                  user_values[1] or "false"]
    finally:
        for name in names:
            os.environ.pop(name, None)


def test_the_allocator_settings_are_made_before_jax_starts_its_backend(tmp_path):
    """In a fresh process, ``hsae train`` has set them by the time JAX creates a backend."""
    import subprocess
    import sys

    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    script = (
        "import os, jax._src.xla_bridge as xb\n"
        "real = xb.backends\n"
        "seen = []\n"
        "def spy():\n"
        "    seen.append(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))\n"
        "    return real()\n"
        "xb.backends = spy\n"
        "from hsae_jax.cli import main\n"
        f"main({argv!r})\n"
        "assert seen and seen[0] == '0.95', seen\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_one_process_run_names_bad_data_before_starting_jax(tmp_path):
    """A bad --data path is named before JAX's backend starts (on a GPU: before CUDA is
    set up and its memory reserved): the processes' start-up exchange costs a one-process
    run nothing."""
    import subprocess
    import sys

    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress",
            "--data", str(tmp_path / "missing.npy")]
    script = (
        "import jax._src.xla_bridge as xb\n"
        "from hsae_jax.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    print('status', e.code, 'backend', xb.backends_are_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert "status 2 backend False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "missing.npy" in proc.stderr
