"""The xla backend never materialises [B, K, D]: XLA's own memory analysis says so."""

from __future__ import annotations

import jax
from conftest import make_inputs

import hsae_jax

B, K, F, D = 64, 512, 128, 256  # B * K * D * 4 bytes = 32 MiB
BKD_BYTES = B * K * D * 4


def temp_bytes(backend: str) -> int:
    indices, weight, vals, bias, target = make_inputs(0, B, K, F, D)

    def loss(weight, vals, bias, target):
        return hsae_jax.hierarchical_sae_loss(indices, weight, vals, bias, target,
                                              backend=backend)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    analysis = step.lower(weight, vals, bias, target).compile().memory_analysis()
    return analysis.temp_size_in_bytes


def test_reference_materialises_bkd():
    """The check can fail: the reference's temporaries do hold [B, K, D]."""
    assert temp_bytes("reference") >= BKD_BYTES


def test_xla_backend_temporaries_are_far_below_bkd():
    used = temp_bytes("xla")
    assert used < BKD_BYTES / 8, f"xla backend temp {used / 2**20:.1f} MiB"
