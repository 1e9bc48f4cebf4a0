"""A deterministic run asks XLA for deterministic ops before JAX starts its backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import requires_gpu, requires_interpreter

from hsae_jax import xla_determinism

CHILD = r"""
import json, os, sys
from hsae_jax.train import TrainConfig, train
messages = []
shape = json.loads(sys.argv[3])
tc = TrainConfig.from_flat(**shape, eval_batches=1, log_every=1,
                           deterministic=sys.argv[2] == "1")
train(tc, sys.argv[1], progress=False, log=messages.append)
import jax
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "backend": jax.default_backend(), "messages": messages}))
"""


def _marked(marks):
    def apply(test):
        for mark in marks:
            test = mark(test)
        return test
    return apply


TINY = dict(d_model=8, n_latents=16, k=4, batch_size=16, steps=2, save_every=2,
            backend="interpret")


def _train_in_child(run_dir, deterministic: bool, xla_flags: str | None = None,
                    shape: dict = TINY) -> dict:
    """Trains in a fresh process (its own compilation and autotuning, no persistent
    compilation cache); returns what it reports."""
    drop = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if shape["backend"] == "interpret":
        env["TRITON_INTERPRET"] = "1"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", CHILD, str(run_dir),
                          "1" if deterministic else "0", json.dumps(shape)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dead_tokens", [10**9, 2048], ids=["no-dead", "auxk"])
@_marked(requires_gpu)
def test_deterministic_training_is_bitwise_the_same_in_two_processes(tmp_path, dead_tokens):
    """Two processes, each compiling and autotuning afresh, train the same deterministic
    run on the triton backend (hot latents from the synthetic data; with a small
    dead_tokens most latents die, so AuxK runs): the parameters end bitwise equal."""
    from safetensors.numpy import load_file

    shape = dict(d_model=256, n_latents=4096, k=32, batch_size=1024, steps=20, save_every=20,
                 backend="triton", dead_tokens=dead_tokens, synthetic_features=512,
                 synthetic_active=24.0)
    params = []
    for name in ("a", "b"):
        report = _train_in_child(tmp_path / name, True, shape=shape)
        assert xla_determinism.FLAG in report["xla_flags"].split()
        params.append(load_file(str(tmp_path / name / "sae.safetensors")))
    assert params[0].keys() == params[1].keys()
    for key in params[0]:
        np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)


@_marked(requires_interpreter)
def test_a_deterministic_run_starts_xla_with_deterministic_ops(tmp_path):
    report = _train_in_child(tmp_path / "run", deterministic=True,
                             xla_flags="--xla_force_host_platform_device_count=1")
    assert report["xla_flags"].split() == ["--xla_force_host_platform_device_count=1",
                                          xla_determinism.FLAG]
    assert report["backend"] == "cpu"  # XLA took the flag and trained
    assert not any("warning" in m for m in report["messages"])


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_deterministic_runs_on_the_xla_backends_train_with_xlas_deterministic_ops(
        tmp_path, backend):
    """--deterministic with a backend that runs no Triton kernel: no kernel settings to
    pass (it used to fail with 'does not configure backend'), XLA's flag set, the same
    parameters twice."""
    from safetensors.numpy import load_file

    shape = {**TINY, "backend": backend}
    params = []
    for name in ("a", "b"):
        report = _train_in_child(tmp_path / name, True, shape=shape)
        assert xla_determinism.FLAG in report["xla_flags"].split()
        params.append(load_file(str(tmp_path / name / "sae.safetensors")))
    for key in params[0]:
        np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)


RESUME_CHILD = r"""
import json, os, sys
from hsae_jax.train import resume
messages = []
resume(sys.argv[1], steps=4, progress=False, log=messages.append)
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "messages": messages}))
"""


@_marked(requires_interpreter)
def test_resuming_a_deterministic_run_also_starts_xla_with_deterministic_ops(tmp_path):
    """resume() reads the saved settings with orbax, which starts JAX's backend: the flag
    is added before that, from the checkpoint's JSON."""
    _train_in_child(tmp_path / "run", deterministic=True)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",
                                                            "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", RESUME_CHILD, str(tmp_path / "run")],
                         env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["xla_flags"].split() == [xla_determinism.FLAG]
    assert not any("warning" in m for m in report["messages"])


@_marked(requires_interpreter)
def test_other_runs_leave_xla_flags_alone(tmp_path):
    assert _train_in_child(tmp_path / "run", deterministic=False)["xla_flags"] == ""


@pytest.mark.parametrize("flags, expected", [
    ("", False), ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops", True), ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops_extra=true", False)])
def test_reads_the_flag_as_xla_does_last_one_wins(flags, expected):
    assert xla_determinism._flag_set(flags) is expected


def test_too_late_on_a_cpu_needs_no_flag_and_says_nothing(monkeypatch):
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the backend has started in this process
    monkeypatch.setenv("XLA_FLAGS", "")
    messages = []
    assert xla_determinism.request(messages.append) is False
    assert os.environ["XLA_FLAGS"] == "" and messages == []
