"""A synthetic activation generator with a known ground-truth dictionary."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sparse superposition with a known ground-truth dictionary.

    n_features unit-norm directions in d_model dimensions (more features than
    dimensions: superposition). Feature i fires with probability ~ 1 / (i + 1)^zipf_exponent
    (heavy-tailed), scaled so that ``mean_active`` features fire per token on average;
    its magnitude has a per-feature scale (lognormal, ``norm_spread``) times an
    exponential draw. Features are grouped in consecutive runs of ``group_size``: when a
    group's first feature fires, each other member fires too with probability
    ``co_occurrence``. Gaussian noise of std ``noise`` is added.
    """

    d_model: int = 64
    n_features: int = 256
    mean_active: float = 5.0
    zipf_exponent: float = 0.8
    norm_spread: float = 0.5
    group_size: int = 4
    grouped_fraction: float = 0.25
    co_occurrence: float = 0.5
    noise: float = 0.01
    seed: int = 0


class SyntheticActivations:
    """Batches of synthetic activations; ``features`` is the true dictionary [n, D]."""

    def __init__(self, cfg: SyntheticConfig, batch_size: int):
        self.cfg = cfg
        self.batch_size = batch_size
        self.d_model = cfg.d_model
        rng = np.random.default_rng(cfg.seed)
        features = rng.normal(size=(cfg.n_features, cfg.d_model))
        self.features = jnp.asarray(features / np.linalg.norm(features, axis=1, keepdims=True),
                                    jnp.float32)
        ranks = rng.permutation(cfg.n_features)  # which feature is how frequent
        p = 1.0 / (ranks + 1.0) ** cfg.zipf_exponent
        p = np.minimum(p * cfg.mean_active / p.sum(), 0.9)
        self.probs = jnp.asarray(p, jnp.float32)
        self.scales = jnp.asarray(rng.lognormal(0.0, cfg.norm_spread, cfg.n_features),
                                  jnp.float32)
        n_grouped = int(cfg.n_features * cfg.grouped_fraction) // cfg.group_size * cfg.group_size
        leader = np.arange(cfg.n_features)
        if cfg.group_size > 1 and n_grouped:
            leader[:n_grouped] = leader[:n_grouped] // cfg.group_size * cfg.group_size
        self.leader = jnp.asarray(leader, jnp.int32)
        self._key = jax.random.key(cfg.seed)
        self._generate = _synthetic_batch

    def batch(self, step: int) -> jax.Array:
        """[batch_size, D] float32 activations of batch number ``step``."""
        return self._generate(self._key, step, self.batch_size, self.features, self.probs,
                              self.scales, self.leader, self.cfg.co_occurrence,
                              self.cfg.noise)

    def placed(self, sharding: jax.sharding.NamedSharding) -> SyntheticActivations:
        """This generator making every batch with ``sharding`` (rows split over devices):
        each device draws and mixes only its own rows, so on a data-parallel mesh no
        device makes the whole batch for the others. The random draws are the same on
        any mesh (partitionable random bits); the mixing matmul's float32 rounding may
        differ with the rows per device. This process's devices only."""
        placed = copy.copy(self)
        everywhere = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        for name in ("features", "probs", "scales", "leader", "_key"):  # once, not per batch
            setattr(placed, name, jax.device_put(getattr(self, name), everywhere))
        placed._generate = jax.jit(_batch_rows, static_argnums=(2,), out_shardings=sharding)
        return placed

    def describe(self) -> str:
        c = self.cfg
        return (f"synthetic: {c.n_features} features in {c.d_model} dims, "
                f"~{c.mean_active:g} active per token, seed {c.seed}")


def _batch_rows(key, step, batch_size, features, probs, scales, leader, co_occurrence,
                noise):
    k_fire, k_group, k_mag, k_noise = jax.random.split(jax.random.fold_in(key, step), 4)
    n = probs.shape[0]
    fires = jax.random.uniform(k_fire, (batch_size, n)) < probs
    is_member = leader != jnp.arange(n)
    joins = fires[:, leader] & (jax.random.uniform(k_group, (batch_size, n)) < co_occurrence)
    active = fires | (is_member & joins)
    magnitude = scales * jax.random.exponential(k_mag, (batch_size, n))
    x = (active * magnitude) @ features
    return x + noise * jax.random.normal(k_noise, x.shape)


_synthetic_batch = jax.jit(_batch_rows, static_argnums=(2,))
