"""The HierarchicalTopK SAE: a Flax NNX module over a functional core.

Shapes: D = d_model, F = n_latents, K = k. Parameters, all float32 masters:

- ``W_enc`` [F, D]: encoder directions, one row per latent (stored transposed, so the
  sparse encoder backward scatters contiguous rows; the safetensors file holds the
  conventional [D, F]);
- ``b_enc`` [F], ``W_dec`` [F, D] (rows kept at unit norm), ``b_dec`` [D].

State that is not trained: ``input_scale`` (inputs are multiplied by it so that
E||x||^2 = D; the model works in that scaled space and returns reconstructions in the
caller's units) and ``tokens_since_fired`` [F] (for dead latents and AuxK).

The pure functions (:func:`sae_loss`, :func:`encode_arrays`, ...) take plain dicts of
arrays, which the training loop jits, shards and checkpoints; the module wraps them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsae_jax.auxk import auxk_loss, auxk_loss_and_add_grads
from hsae_jax.encoder import topk_encode
from hsae_jax.io_utils import atomic_write, atomic_write_json, read_json_object
from hsae_jax.kernel_settings import DEFAULT_KERNELS, KernelSettings
from hsae_jax.loss import hierarchical_sae_loss, topk_sae_loss
from hsae_jax.sparse_rows import weighted_row_sum

OBJECTIVES = ("hierarchical", "topk")
COMPUTE_DTYPES = ("float32", "bfloat16")
INPUT_RANGE = (1e-30, 1e36)  # largest |value| of a sample the input scale handles
INT32_MAX = 2**31 - 1  # latent indices are int32
MAX_DEAD_TOKENS = 2**30  # where the tokens-since-fired counters saturate


def setting(default, help: str):  # noqa: A002 - argparse's word
    """A dataclass field with the help text the CLI shows for it."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE and its objective (saved in a run's ``cfg.json``).

    d_model: D. n_latents: F. k: K, latents kept per token.
    objective: ``"hierarchical"`` (the mean of every prefix's error: good at every
      budget k <= K) or ``"topk"`` (the full-K error only: the usual TopK SAE).
    budgets: optional tuple of budgets k to train for (hierarchical objective with
      one-hot prefix weights at those k); None: every k = 1..K.
    auxk_coef: weight of the AuxK loss on dead latents (0 turns it off).
    aux_k: latents the AuxK loss uses (None: min(D // 2, F)).
    dead_tokens: a latent that has not fired for this many tokens is dead.
    auxk_max_fraction: AuxK computes at most this share of the latents per step (see
      :mod:`hsae_jax.auxk`); 1: every dead latent.
    compute_dtype: ``"float32"`` or ``"bfloat16"`` for the encoder and decoder inputs
      (master weights stay float32; accumulation is float32).
    auxk_dtype: ``"float32"`` (the operands as they are: TF32 on GPUs at the default
      matmul precision) or ``"bfloat16"`` for the operands of AuxK's matmuls (its
      reconstruction from the dead latents and the products of its gradients; float32
      accumulation). The dead latents are the same either way, and so is each token's top
      aux_k of them where the step keeps the main encoder's pre-activations (the trainer's
      default); where AuxK computes the dead columns' pre-activations itself (the
      one-device ``sae_loss``, ``--encoder-rows``, ``--auxk-max-fraction`` below 1), that
      product is in this dtype too.
    Which backend runs the ops is not part of the model: see :class:`KernelSettings`.
    """

    d_model: int = setting(64, "D: activation width (with --data: the data's width)")
    n_latents: int = setting(512, "F: number of latents")
    k: int = setting(16, "K: latents kept per token (the largest budget)")
    objective: str = setting("hierarchical", "hierarchical (every budget k <= K) or topk")
    budgets: tuple[int, ...] | None = setting(
        None, "comma-separated budgets to train for (default: every k = 1..K)")
    auxk_coef: float = setting(1.0 / 32.0, "weight of the AuxK loss on dead latents (0: off)")
    aux_k: int | None = setting(None, "latents used by AuxK (default: min(D/2, F))")
    dead_tokens: int = setting(1_000_000, "a latent not fired for this many tokens is dead")
    auxk_max_fraction: float = setting(
        1.0, "largest share of the latents (of each model shard) AuxK computes in a step: 1, "
        "1/4, 1/16 or 1/64; below 1 it caps AuxK's memory, and when more are dead the "
        "lowest-numbered dead latents take part")
    compute_dtype: str = setting("float32", "float32 or bfloat16 encoder/decoder inputs")
    auxk_dtype: str = setting("float32", "float32 or bfloat16 operands of AuxK's matmuls "
                              "(float32 accumulation)")

    def __post_init__(self):
        for name, high in (("d_model", INT32_MAX), ("n_latents", INT32_MAX), ("k", INT32_MAX),
                           ("dead_tokens", MAX_DEAD_TOKENS)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAEConfig.{name}={value!r} must be an int >= 1")
            if value > high:
                raise ValueError(f"SAEConfig.{name}={value!r} must be an int <= {high}")
        if self.k > self.n_latents:
            raise ValueError(
                f"SAEConfig.k={self.k} must be <= SAEConfig.n_latents={self.n_latents}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SAEConfig.objective={self.objective!r} must be one of {OBJECTIVES}")
        for name in ("compute_dtype", "auxk_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise ValueError(f"SAEConfig.{name}={getattr(self, name)!r} must be one of "
                                 f"{COMPUTE_DTYPES}")
        if self.budgets is not None:
            if (not self.budgets or any(not isinstance(b, int) or not 1 <= b <= self.k
                                        for b in self.budgets)):
                raise ValueError(
                    f"SAEConfig.budgets={self.budgets} must be ints in [1, k={self.k}]")
            if self.objective == "topk":
                raise ValueError("SAEConfig.budgets applies to the hierarchical objective; "
                                 "objective='topk' trains budget k only")
        if (not isinstance(self.auxk_coef, (int, float)) or isinstance(self.auxk_coef, bool)
                or not math.isfinite(self.auxk_coef) or self.auxk_coef < 0):
            raise ValueError(f"SAEConfig.auxk_coef={self.auxk_coef} must be finite and >= 0")
        if self.auxk_max_fraction not in (1.0, 0.25, 0.0625, 0.015625):
            raise ValueError(f"SAEConfig.auxk_max_fraction={self.auxk_max_fraction!r} must be "
                             "1, 0.25, 0.0625 or 0.015625")
        if self.aux_k is not None and (not isinstance(self.aux_k, int) or isinstance(
                self.aux_k, bool) or not 1 <= self.aux_k <= INT32_MAX):
            raise ValueError(f"SAEConfig.aux_k={self.aux_k!r} must be an int in [1, {INT32_MAX}]")

    @property
    def resolved_aux_k(self) -> int:
        return min(self.aux_k or self.d_model // 2, self.n_latents) or 1

    def prefix_weights(self) -> jax.Array | None:
        if self.budgets is None:
            return None
        return jnp.zeros((self.k,), jnp.float32).at[jnp.asarray(self.budgets) - 1].set(1.0)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["budgets"] = list(self.budgets) if self.budgets is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict) -> SAEConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields}
        if data.get("budgets") is not None:
            data["budgets"] = tuple(data["budgets"])
        return cls(**data)


# ----------------------------------------------------------------- functional core


def init_arrays(cfg: SAEConfig, key: jax.Array, sample: jax.Array | None = None):
    """(params, stats) dicts for a new SAE; ``sample`` [N, D] sets input scale and b_dec."""
    w_dec = jax.random.normal(key, (cfg.n_latents, cfg.d_model), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
    scale = jnp.float32(1.0)
    b_dec = jnp.zeros((cfg.d_model,), jnp.float32)
    if sample is not None:
        scale, b_dec = input_statistics(sample, cfg.d_model)
    params = {
        "W_enc": jnp.array(w_dec, copy=True),  # W_dec transposed: equal in [F, D] storage
        "b_enc": jnp.zeros((cfg.n_latents,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": b_dec,
    }
    stats = {
        "input_scale": jnp.asarray(scale, jnp.float32),
        "tokens_since_fired": jnp.zeros((cfg.n_latents,), jnp.int32),
    }
    return params, stats


def input_statistics(sample: jax.Array, d_model: int) -> tuple[jax.Array, jax.Array]:
    """(input_scale, b_dec) from the rows of ``sample`` [N, D] without NaN or inf.

    ``input_scale`` makes E||x||^2 = D over those rows, ``b_dec`` is their scaled mean.
    Values near float32's limits (1e30, 1e-30) are handled by rescaling first; a sample
    with no finite, non-zero row gives scale 1 (:func:`finite_rows` refuses one first).
    """
    x = jnp.asarray(sample, jnp.float32)
    finite = jnp.all(jnp.isfinite(x), axis=1)
    x = jnp.where(finite[:, None], x, 0.0)
    n = jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
    mean_sq = jnp.sum(jnp.sum(x * x, axis=1)) / n
    # rows scaled to a largest entry of 1 first: their squares neither overflow nor vanish
    peak = jnp.max(jnp.abs(x))
    unit = jnp.where(peak > 0, peak, 1.0)
    mean_sq_unit = jnp.sum(jnp.sum((x / unit) ** 2, axis=1)) / n
    direct = jnp.isfinite(mean_sq) & (mean_sq > 0) & (mean_sq_unit > 0)
    scale = jnp.where(direct, jnp.sqrt(d_model / jnp.where(direct, mean_sq, 1.0)),
                      jnp.sqrt(d_model / jnp.where(mean_sq_unit > 0, mean_sq_unit, d_model))
                      / unit)
    b_dec = jnp.sum(x * scale, axis=0) / n
    return scale.astype(jnp.float32), b_dec.astype(jnp.float32)


def finite_rows(sample, what: str = "sample") -> int:
    """How many rows of ``sample`` [N, D] hold no NaN or inf; ValueError naming ``what``
    when none does, or when every such row is zero (no input scale can come from it)."""
    x = np.asarray(jax.device_get(sample))
    finite = np.all(np.isfinite(x), axis=1)
    if not finite.any():
        raise ValueError(f"{what} has no finite rows (every row holds NaN or inf): "
                         "cannot set the input scale")
    peak = float(np.max(np.abs(x[finite]))) if x.size else 0.0
    if peak == 0:
        raise ValueError(f"{what} is all zeros: cannot set the input scale")
    if not INPUT_RANGE[0] <= peak <= INPUT_RANGE[1]:
        raise ValueError(f"{what} has a largest |value| of {peak:.3g}, outside the "
                         f"{INPUT_RANGE[0]:g} to {INPUT_RANGE[1]:g} float32 training "
                         "handles: rescale the data")
    return int(finite.sum())


def _cast(cfg: SAEConfig, x):
    return x.astype(jnp.bfloat16) if cfg.compute_dtype == "bfloat16" else x


def scale_inputs(stats, x):
    """Raw activations -> the model's space, where E||x||^2 = D (float32)."""
    return x.astype(jnp.float32) * stats["input_scale"]


def encode_arrays(cfg: SAEConfig, params, stats, x, k: int | None = None,
                  kernels: KernelSettings = DEFAULT_KERNELS):
    """Raw activations x [B, D] -> (vals [B, k] float32 >= 0, indices [B, k] int32)."""
    xs = scale_inputs(stats, x)
    return topk_encode(_cast(cfg, xs), _cast(cfg, params["W_enc"]), params["b_enc"],
                       params["b_dec"], cfg.k if k is None else k, backend=kernels.backend,
                       topk_config=kernels.topk, config=kernels.encoder)


def decode_arrays(params, stats, vals, indices, k: int | None = None, chunk: int = 8):
    """Reconstruction [B, D] float32 (caller's units) from the first k latents."""
    if k is not None:
        vals, indices = vals[:, :k], indices[:, :k]
    w = params["W_dec"]
    recon0 = jnp.broadcast_to(params["b_dec"].astype(jnp.float32),
                              (indices.shape[0], w.shape[1]))
    recon = weighted_row_sum(w, indices, vals, chunk, recon0)
    return recon / stats["input_scale"]


def sae_loss(cfg: SAEConfig, params, stats, x, kernels: KernelSettings = DEFAULT_KERNELS, *,
             with_auxk: bool = True):
    """Training objective on raw activations x [B, D].

    Returns (loss, aux) with aux = dict(recon_loss, auxk_loss, l0, fired [F] bool,
    num_dead, vals, indices). The reconstruction term is :func:`hierarchical_sae_loss` (or
    the TopK loss) in the scaled space; AuxK (:mod:`hsae_jax.auxk`) reconstructs the
    residual from the top aux_k dead latents, only when some latent is dead
    (``with_auxk=False`` leaves it out: :func:`sae_loss_and_grads` adds it separately).
    """
    xs = scale_inputs(stats, x)
    w_dec = _cast(cfg, params["W_dec"])
    vals, indices = encode_arrays(cfg, params, stats, x, kernels=kernels)
    loss_kw = dict(backend=kernels.backend, config=kernels.loss)
    if cfg.objective == "topk":
        recon_loss = topk_sae_loss(indices, w_dec, vals, params["b_dec"], xs, **loss_kw)
    else:
        recon_loss = hierarchical_sae_loss(indices, w_dec, vals, params["b_dec"], xs,
                                           prefix_weights=cfg.prefix_weights(), **loss_kw)
    dead = stats["tokens_since_fired"] >= cfg.dead_tokens
    auxk = jnp.float32(0.0)
    if cfg.auxk_coef > 0 and with_auxk:
        auxk = auxk_loss(cfg, params, xs, vals, indices, dead, kernels)
    fired = fired_latents(indices, vals, cfg.n_latents)
    aux = {
        "recon_loss": recon_loss,
        "auxk_loss": auxk,
        "l0": jnp.mean(jnp.sum(vals > 0, axis=1).astype(jnp.float32)),
        "fired": fired,
        "num_dead": jnp.sum(dead),
        "vals": vals,
        "indices": indices,
    }
    return recon_loss + cfg.auxk_coef * auxk, aux


def sae_loss_and_grads(cfg: SAEConfig, params, stats, x,
                       kernels: KernelSettings = DEFAULT_KERNELS):
    """((loss, aux), grads): ``jax.value_and_grad(sae_loss, has_aux=True)``, the way the
    trainer computes it: autodiff of everything but AuxK, then AuxK's value and gradient
    added in place to the dead latents' rows only (:func:`auxk_loss_and_add_grads`), so a
    step without dead latents pays nothing for AuxK."""
    grad_fn = jax.value_and_grad(functools.partial(sae_loss, cfg, kernels=kernels,
                                                   with_auxk=False), has_aux=True)
    (loss, aux), grads = grad_fn(params, stats, x)
    if cfg.auxk_coef > 0:
        dead = stats["tokens_since_fired"] >= cfg.dead_tokens
        auxk, grads = auxk_loss_and_add_grads(cfg, params, scale_inputs(stats, x), aux["vals"],
                                              aux["indices"], dead, grads, kernels)
        loss = loss + cfg.auxk_coef * auxk
        aux = {**aux, "auxk_loss": auxk}
    return (loss, aux), grads


def fired_latents(indices, vals, n_latents: int) -> jax.Array:
    """[F] bool: which latents have a positive value for some token."""
    return jnp.zeros((n_latents,), jnp.bool_).at[indices.reshape(-1)].max(vals.reshape(-1) > 0)


def project_decoder_grad(w_dec, grad):
    """Removes from each row of the W_dec gradient its component along that row."""
    return grad - jnp.sum(grad * w_dec, axis=1, keepdims=True) * w_dec


def normalize_decoder(w_dec):
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- module


class SAEStat(nnx.Variable):
    """Model state that is not trained (input scale, dead-latent counters)."""


class HierarchicalTopKSAE(nnx.Module):
    """HierarchicalTopK sparse autoencoder (Flax NNX).

    One trained model serves every budget k <= K: ``decode(vals, indices, k)`` uses the
    first k latents of each token (latents come sorted by value).

    Example::

        sae = HierarchicalTopKSAE(SAEConfig(d_model=64, n_latents=512, k=16),
                                  rngs=nnx.Rngs(0), sample=activations)
        vals, indices = sae.encode(x)
        x_hat_4 = sae.decode(vals, indices, k=4)
        loss = sae.loss(x)
    """

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs | None = None,
                 sample: jax.Array | None = None, arrays: tuple[dict, dict] | None = None,
                 kernels: KernelSettings = DEFAULT_KERNELS):
        """A new SAE (``rngs``; ``sample`` [N, D] sets input scale and b_dec), or one
        holding given ``arrays`` = (params, stats). ``kernels``: which backend (and op
        configs) its encode, decode and loss run on; not saved with the model."""
        self.cfg = cfg
        self.kernels = kernels
        if arrays is None:
            if rngs is None:
                raise ValueError("HierarchicalTopKSAE needs rngs= (or arrays=)")
            if sample is not None and (len(np.shape(sample)) != 2
                                       or np.shape(sample)[1] != cfg.d_model):
                raise ValueError(f"sample must have shape [N, D={cfg.d_model}], got "
                                 f"{tuple(np.shape(sample))}")
            if sample is not None and not isinstance(sample, jax.core.Tracer):
                finite_rows(sample)
            arrays = init_arrays(cfg, rngs.params(), sample)
        self._set_arrays(*arrays)

    def _set_arrays(self, params, stats) -> None:
        self.W_enc = nnx.Param(params["W_enc"])
        self.b_enc = nnx.Param(params["b_enc"])
        self.W_dec = nnx.Param(params["W_dec"])
        self.b_dec = nnx.Param(params["b_dec"])
        self.input_scale = SAEStat(stats["input_scale"])
        self.tokens_since_fired = SAEStat(stats["tokens_since_fired"])

    @classmethod
    def from_arrays(cls, cfg: SAEConfig, params: dict, stats: dict,
                    kernels: KernelSettings = DEFAULT_KERNELS) -> HierarchicalTopKSAE:
        return cls(cfg, arrays=(params, stats), kernels=kernels)

    def params(self) -> dict:
        return {n: getattr(self, n)[...] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def stats(self) -> dict:
        return {n: getattr(self, n)[...] for n in ("input_scale", "tokens_since_fired")}

    def encode(self, x: jax.Array, k: int | None = None):
        """x [B, D] -> (vals [B, k] float32, indices [B, k] int32), sorted by value.

        k: latents kept per token, 1 <= k <= F (None: the model's K)."""
        if k is not None:
            _check_budget("k", k, self.cfg.n_latents, "F")
        return encode_arrays(self.cfg, self.params(), self.stats(), x, k, self.kernels)

    def decode(self, vals: jax.Array, indices: jax.Array, k: int | None = None) -> jax.Array:
        """[B, D] float32 reconstruction from the first k latents (None: all given).

        vals [B, n] float, indices [B, n] int (from :meth:`encode`); 1 <= k <= n."""
        if k is not None:
            _check_budget("k", k, indices.shape[-1], "the latents given")
        return decode_arrays(self.params(), self.stats(), vals, indices, k)

    def __call__(self, x: jax.Array, k: int | None = None) -> jax.Array:
        """Reconstruction of x [B, D] at budget k (None: K)."""
        vals, indices = self.encode(x)
        return self.decode(vals, indices, k)

    def loss(self, x: jax.Array) -> jax.Array:
        """The training objective (scalar float32) on raw activations x [B, D]."""
        return sae_loss(self.cfg, self.params(), self.stats(), x, self.kernels)[0]

    # ------------------------------------------------------------------ persistence

    def save(self, run_dir: str, extra_cfg: dict | None = None) -> None:
        """Writes ``sae.safetensors`` (W_enc [D, F], b_enc, W_dec, b_dec) and ``cfg.json``.

        Each file is written to a temporary name and renamed: a crash never leaves a
        half-written file under the real name.
        """
        save_model_files(run_dir, self.cfg, self.params(), self.stats(), extra_cfg)

    @classmethod
    def load(cls, run_dir: str, kernels: KernelSettings = DEFAULT_KERNELS
             ) -> HierarchicalTopKSAE:
        """The model saved in ``run_dir`` by :meth:`save` or ``hsae train``."""
        cfg, params, stats = load_model_files(run_dir)
        return cls.from_arrays(cfg, params, stats, kernels)


def _check_budget(name: str, k, limit: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= limit:
        raise ValueError(f"{name}={k!r} must be an int in [1, {limit}] ({what})")


def save_model_files(run_dir: str, cfg: SAEConfig, params, stats, extra_cfg=None) -> None:
    from safetensors.numpy import save_file

    os.makedirs(run_dir, exist_ok=True)
    tensors = {
        "W_enc": np.ascontiguousarray(np.asarray(params["W_enc"], np.float32).T),
        "b_enc": np.asarray(params["b_enc"], np.float32),
        "W_dec": np.asarray(params["W_dec"], np.float32),
        "b_dec": np.asarray(params["b_dec"], np.float32),
    }
    meta = {
        **cfg.to_json(),
        "input_scale": float(stats["input_scale"]),
        "W_enc_layout": "[d_model, n_latents]",
        **(extra_cfg or {}),
    }
    atomic_write(os.path.join(run_dir, "sae.safetensors"),
                 lambda path: save_file(tensors, path, metadata={"format": "hsae-jax"}))
    atomic_write_json(os.path.join(run_dir, "cfg.json"), meta)


def load_model_files(run_dir: str):
    """(cfg, params, stats) of the model saved in ``run_dir``; errors name the file."""
    from safetensors.numpy import load_file

    cfg_path = os.path.join(run_dir, "cfg.json")
    meta = read_json_object(cfg_path)
    try:
        cfg = SAEConfig.from_json(meta)
        scale = float(meta.get("input_scale", 1.0))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: {err}") from None
    path = os.path.join(run_dir, "sae.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (cfg.json is there: a model saved "
                                "by hand, half copied?)")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors' errors do not name the file
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    expected = {"W_enc": (cfg.d_model, cfg.n_latents), "b_enc": (cfg.n_latents,),
                "W_dec": (cfg.n_latents, cfg.d_model), "b_dec": (cfg.d_model,)}
    for name, shape in expected.items():
        if name not in tensors or tensors[name].shape != shape:
            got = tensors[name].shape if name in tensors else "missing"
            raise ValueError(f"{path}: {name} is {got}, expected {shape}")
    params = {
        "W_enc": jnp.asarray(tensors["W_enc"].T),
        "b_enc": jnp.asarray(tensors["b_enc"]),
        "W_dec": jnp.asarray(tensors["W_dec"]),
        "b_dec": jnp.asarray(tensors["b_dec"]),
    }
    stats = {"input_scale": jnp.float32(scale),
             "tokens_since_fired": jnp.zeros((cfg.n_latents,), jnp.int32)}
    return cfg, params, stats
