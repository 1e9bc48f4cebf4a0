"""What a run asks of its machine. It checks that its folder's disk holds what it will write
before it trains: the final checkpoint of its whole state and the model file (an error,
exit status 1, before any step), and every kept checkpoint besides (a warning); a
checkpoint is the state's bytes. ``hsae train`` lets XLA use 95% of each GPU's memory
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
from hsae_jax.train import DiskSpaceError, TrainConfig, disk, train
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


def test_a_disk_without_room_for_the_final_checkpoint_and_model_stops_the_run_first(
        tmp_path, monkeypatch):
    tc = TrainConfig.from_flat(**SMALL)
    checkpoint, model = sizes(tc)
    free_space(monkeypatch, checkpoint + model - 1)
    out = tmp_path / "run"
    with pytest.raises(DiskSpaceError, match=r"--out .*run: its disk has .* GB free, but the "
                       r"run writes a checkpoint of .* GB and the model file of .* GB"):
        train(tc, str(out), progress=False, log=lambda *_: None)
    assert not os.path.exists(out / "checkpoints")  # nothing trained, nothing saved
    assert not os.path.exists(out / "metrics.jsonl")


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


def test_room_for_one_checkpoint_but_not_every_kept_one_warns_and_trains(tmp_path,
                                                                         monkeypatch):
    tc = TrainConfig.from_flat(**SMALL)
    checkpoint, model = sizes(tc)
    free_space(monkeypatch, checkpoint + model)  # enough for the end, not for 3 checkpoints
    lines = []
    summary = train(tc, str(tmp_path / "run"), progress=False, log=lines.append)
    assert summary["steps"] == 2
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept checkpoints" in warnings[0]
    free_space(monkeypatch, 3 * checkpoint + model)
    lines.clear()
    train(tc, str(tmp_path / "run2"), progress=False, log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]


@pytest.mark.parametrize("user_value", [None, "0.5"])
def test_hsae_train_lets_xla_use_95_percent_of_a_gpu_unless_told(tmp_path, monkeypatch,
                                                                  user_value):
    if user_value is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", user_value)
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    try:
        assert main(argv) == 0
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == (user_value or "0.95")
    finally:
        os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
