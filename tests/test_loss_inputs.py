"""Bad input to the loss raises a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from conftest import KERNEL_BACKEND, ON_GPU, make_inputs

import hsae_jax
from hsae_jax import BackendUnavailableError, TritonLossConfig, XlaLossConfig

B, K, F, D = 4, 3, 10, 6


def good():
    indices, weight, vals, bias, target = make_inputs(0, B, K, F, D)
    return dict(indices=indices, weight=weight, vals=vals, bias=bias, target=target)


BAD_INPUTS = [
    ("indices", jnp.zeros((B,), jnp.int32), ValueError, r"indices must have shape \[B, K\]"),
    ("weight", jnp.ones((F, D, 1)), ValueError, r"weight must have shape \[F, D\]"),
    ("vals", jnp.ones((B, K + 1)), ValueError, r"vals.shape=\(4, 4\) must equal indices"),
    ("bias", jnp.ones((D + 1,)), ValueError, r"bias.shape=\(7,\) must be \(D,\)=\(6,\)"),
    ("target", jnp.ones((B + 1, D)), ValueError, r"target.shape=\(5, 6\) must be \(B, D\)"),
    ("target", jnp.ones((B, D - 1)), ValueError, r"target.shape=\(4, 5\) must be \(B, D\)"),
    ("indices", jnp.zeros((B, K), jnp.float32), TypeError, "indices has dtype float32"),
    ("indices", jnp.zeros((B, K), jnp.int8), TypeError, "indices has dtype int8"),
    ("weight", jnp.ones((F, D), jnp.int32), TypeError, "weight has dtype int32"),
    ("vals", jnp.ones((B, K), jnp.bool_), TypeError, "vals has dtype bool"),
    ("bias", jnp.ones((D,), jnp.uint8), TypeError, "bias has dtype uint8"),
    ("target", [[1.0] * D] * B, TypeError, "target must be an array, got list"),
    ("indices", jnp.zeros((0, K), jnp.int32), ValueError, "B=0 must be >= 1"),
    ("weight", jnp.ones((F, 0)), ValueError, "D=0 must be >= 1"),
]


@pytest.mark.parametrize("name, value, error, message", BAD_INPUTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
@pytest.mark.parametrize("backend", ["auto", "xla", "reference", KERNEL_BACKEND])
def test_bad_arrays_are_rejected_with_the_argument_named(name, value, error, message, backend):
    args = good()
    args[name] = value
    with pytest.raises(error, match=message):
        hsae_jax.hierarchical_sae_loss(**args, backend=backend)
    with pytest.raises(error, match=message):
        hsae_jax.hierarchical_sae_prefix_sse(**args, backend=backend)


@pytest.mark.parametrize("prefix_weights, error, message", [
    (jnp.ones((K + 1,)), ValueError, r"prefix_weights.shape=\(4,\) must be \(K,\)=\(3,\)"),
    (jnp.ones((K,), jnp.int32), TypeError, "prefix_weights has dtype int32"),
    (jnp.array([1.0, -1.0, 1.0]), ValueError, "non-negative"),
    (jnp.zeros((K,)), ValueError, "positive sum"),
    (jnp.array([1.0, jnp.nan, 1.0]), ValueError, "finite"),
])
def test_bad_prefix_weights_are_rejected(prefix_weights, error, message):
    with pytest.raises(error, match=message):
        hsae_jax.hierarchical_sae_loss(**good(), prefix_weights=prefix_weights, backend="xla")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of"):
        hsae_jax.hierarchical_sae_loss(**good(), backend="cuda")


@pytest.mark.skipif(ON_GPU, reason="the GPU machine can run backend='triton'")
def test_triton_without_a_gpu_says_what_to_use_instead():
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU") as info:
        hsae_jax.hierarchical_sae_loss(**good(), backend="triton")
    assert isinstance(info.value, ValueError)
    assert "backend='xla'" in str(info.value)


def test_auto_backend_runs_anywhere():
    value = hsae_jax.hierarchical_sae_loss(**good())
    ref = hsae_jax.hierarchical_sae_loss(**good(), backend="reference")
    assert jnp.allclose(value, ref, rtol=1e-6)


@pytest.mark.parametrize("backend, config", [
    ("xla", TritonLossConfig()),
    (KERNEL_BACKEND, XlaLossConfig()),
    ("reference", XlaLossConfig()),
    ("xla", {"chunk": 2}),
])
def test_config_must_match_the_backend(backend, config):
    with pytest.raises(TypeError, match="config"):
        hsae_jax.hierarchical_sae_loss(**good(), backend=backend, config=config)


@pytest.mark.parametrize("make, message", [
    (lambda: TritonLossConfig(variant="three_pass"), "variant='three_pass' must be"),
    (lambda: TritonLossConfig(variant="auto"), "variant='auto' must be"),
    (lambda: hsae_jax.WalkConfig(block_d=24), "WalkConfig.block_d=24 must be a power of two"),
    (lambda: hsae_jax.WalkConfig(loop_num_stages=0), "WalkConfig.loop_num_stages=0"),
    (lambda: hsae_jax.PrefixSseConfig(block_b=3), "PrefixSseConfig.block_b=3"),
    (lambda: XlaLossConfig(chunk=0), "XlaLossConfig.chunk=0 must be an int >= 1"),
])
def test_bad_config_is_rejected_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_config_of_the_wrong_type_inside_a_config_is_named():
    with pytest.raises(TypeError, match="TritonLossConfig.fused must be a WalkConfig"):
        TritonLossConfig(fused=XlaLossConfig())


@pytest.mark.skipif(ON_GPU, reason="checked on the CPU machine")
def test_interpret_after_compiled_triton_says_why():
    """Triton fixes compile/interpret at import: asking for the other mode explains that."""
    script = textwrap.dedent("""
        import hsae_jax, hsae_jax.backends as b
        from conftest import make_inputs
        b.import_triton("compiled")
        try:
            hsae_jax.hierarchical_sae_loss(*make_inputs(0, 2, 2, 3, 4), backend="interpret")
        except hsae_jax.BackendUnavailableError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(__file__), timeout=300)
    assert "ERROR: backend='interpret' is not available in this process" in out.stdout, out
    assert "compiled mode" in out.stdout
