"""Memory per device of a training step: ``hsae plan`` and :func:`memory_plan`.

An estimate, in bytes per device, for (F, D, K, B, mesh, dtypes), from what each device
holds (:mod:`hsae_jax.parallel.mesh`; F_l = F/m latents, D_l = D/m, B_l = B/d rows):

- state, kept between steps: W_enc [F_l, D] and W_dec [F, D_l] in ``param_dtype``
  (2·F_l·D elements), the biases, both Adam moments of everything (``adam_dtype``), the
  dead-latent counters [F_l];
- gradients: 2·F_l·D float32 (the kernels write float32); with bfloat16 parameters both
  in bfloat16 and one float32 in flight;
- bfloat16 copies of W_enc and W_dec that the matmuls read, with ``compute_dtype``
  bfloat16 and float32 parameters;
- activations: the encoder's pre-activations [B_l, F_l] float32 ([encoder_rows, F_l]
  with ``--encoder-rows``) and a few [B_l, D];
- AuxK (``auxk_coef`` > 0), in its largest column bucket n = ``auxk_max_fraction``·F_l,
  compiled whether or not latents are dead: pre-activations, activations and their
  gradient [B_l, n] float32 (x3); the gathered rows of W_enc / W_dec and their gradients
  (4·n·D) when n < F_l, else dense [F_l, D] float32 gradients of both (x2), and on m > 1
  the all-to-all copy of W_dec's rows and its gradient;
- the optimizer's temporaries: one float32 [F_l, D] per matrix (2·F_l·D; what XLA's CPU
  buffer assignment shows, an upper bound where the update fuses, and what the H200 showed
  at F = 2^22 on two GPUs), divided by ``update_blocks`` when the update runs a block of
  latents at a time (:mod:`hsae_jax.parallel.row_blocks`).

Peak = state + gradients + copies + max(activations + AuxK, optimizer). XLA decides the
real buffers: ``hsae plan --compile`` compiles the step (without running it) on this
machine's devices and prints XLA's own figure (``memory_analysis``) beside the estimate.
"""

from __future__ import annotations

import dataclasses

from hsae_jax.parallel.mesh import MeshShape

GIB = 1024**3
GB = 1e9
H200_BYTES = 141 * GB
_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    n_latents: int
    d_model: int
    k: int = 64
    batch_size: int = 4096
    data: int = 1
    model: int = 1
    param_dtype: str = "float32"
    adam_dtype: str = "float32"
    compute_dtype: str = "float32"
    auxk: bool = True
    auxk_max_fraction: float = 1.0
    encoder_rows: int | None = None
    update_blocks: int | None = None

    @classmethod
    def from_train_config(cls, tc, devices: int) -> PlanSettings:
        data, model = MeshShape.parse(tc.mesh).resolve(devices)
        sae = tc.sae
        return cls(n_latents=sae.n_latents, d_model=sae.d_model, k=sae.k,
                   batch_size=tc.batch_size, data=data, model=model,
                   param_dtype=tc.param_dtype, adam_dtype=tc.adam_dtype,
                   compute_dtype=sae.compute_dtype, auxk=sae.auxk_coef > 0,
                   auxk_max_fraction=sae.auxk_max_fraction, encoder_rows=tc.encoder_rows,
                   update_blocks=tc.update_blocks)


def memory_plan(s: PlanSettings) -> dict:
    """Bytes per device by part (see the module docstring) and ``total``."""
    f_l, d, b_l = s.n_latents // s.model, s.d_model, s.batch_size // s.data
    p, a = _BYTES[s.param_dtype], _BYTES[s.adam_dtype]
    mat = f_l * d  # elements of one matrix block (W_enc's or W_dec's)
    parts = {
        "parameters": 2 * mat * p + (f_l + d) * 4,
        "adam_moments": 2 * (2 * mat + f_l + d) * a,
        "counters": f_l * 4,
        # float32 as the kernels write them; in bfloat16 storage: both cast, one in flight
        "gradients": 2 * mat * 4 if p == 4 else mat * 4 + 2 * mat * p,
        "bf16_copies": 2 * mat * 2 if s.compute_dtype == "bfloat16" and p == 4 else 0,
    }
    rows = min(b_l, s.encoder_rows or b_l)
    activations = rows * f_l * 4 + 6 * b_l * d * 4 + 4 * b_l * s.k * 8
    auxk = 0
    if s.auxk:
        n = max(1, int(f_l * s.auxk_max_fraction))
        auxk = 3 * b_l * n * 4
        if n < f_l:
            auxk += 4 * n * d * 4
        else:
            auxk += 2 * mat * 4 + (2 * mat * 4 if s.model > 1 else 0)
    parts["activations"] = activations
    parts["auxk"] = auxk
    optimizer = 2 * mat * 4 // (s.update_blocks or 1)
    parts["optimizer"] = optimizer
    steady = sum(parts[k] for k in ("parameters", "adam_moments", "counters", "gradients",
                                    "bf16_copies"))
    parts["total"] = steady + max(activations + auxk, optimizer)
    return parts


USABLE_FRACTION = 0.9
"""Share of a device's memory an estimate may fill. The rest is for what the estimate
leaves out: the CUDA context, XLA's, cuBLAS's and Triton's workspaces, batches in flight,
evaluation and fragmentation. Measured on the H200s: F = 2^22 on 2 GPUs with the low-memory
options, estimated 135 GB per device (96% of 141 GB), ran out of memory in its first step;
F = 2^19 on one GPU, estimated 83 GB (59%), trained with an 80 GB peak."""


def fits(total: int, device_bytes: float = H200_BYTES) -> bool:
    """Whether an estimate of ``total`` bytes trains on a device of ``device_bytes``."""
    return total <= USABLE_FRACTION * device_bytes


def compiled_memory(tc, devices: int | None = None) -> dict:
    """XLA's memory per device for ``tc``'s step on this machine's devices: compiled from
    shapes only (nothing is allocated). Returns argument / temp / output bytes."""
    import jax
    import jax.numpy as jnp

    from hsae_jax.parallel.mesh import make_layout
    from hsae_jax.parallel.state import abstract_state
    from hsae_jax.train.step import make_optimizer, make_train_step

    layout = make_layout(MeshShape.parse(tc.mesh), devices or tc.devices)
    tx = make_optimizer(tc, layout)
    state = abstract_state(layout, tc.sae, tx, tc.param_dtype)
    x = jax.ShapeDtypeStruct((tc.batch_size, tc.sae.d_model), jnp.float32,
                             sharding=layout.batch_sharding)
    step = make_train_step(tc.sae, tx, layout, tc.kernels(), update=tc.row_blocks())
    memory = step.lower(state["params"], state["stats"], state["opt_state"], x).compile(
    ).memory_analysis()
    argument, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    return {"argument": argument, "temp": temp, "output": memory.output_size_in_bytes,
            "total": argument + temp, "devices": layout.size,
            "mesh": f"data={layout.axes.data},model={layout.axes.model}"}


LOW_MEMORY = dict(param_dtype="bfloat16", adam_dtype="bfloat16", compute_dtype="bfloat16",
                  auxk_max_fraction=0.015625, encoder_rows=1024, update_blocks=64)


def plan_table(latents=(2**20, 2**22, 2**24), d_models=(2304, 4096), gpus=(1, 2, 4, 8),
               k: int = 64, batch_size: int = 4096, **options) -> list[dict]:
    """Rows of the README's table: every dictionary on m = gpus (data = 1), estimate in GB."""
    rows = []
    for d in d_models:
        for f in latents:
            row = {"d_model": d, "n_latents": f}
            for m in gpus:
                total = memory_plan(PlanSettings(f, d, k, batch_size, 1, m, **options))["total"]
                row[m] = total
            rows.append(row)
    return rows


def format_table(rows: list[dict], gpus=(1, 2, 4, 8), device_bytes: float = H200_BYTES) -> str:
    head = "| D | F | " + " | ".join(f"{m} GPU{'s' if m > 1 else ''}" for m in gpus) + " |"
    lines = [head, "|" + "---|" * (2 + len(gpus))]
    for row in rows:
        cells = [f"{row[m] / GB:.0f}" + ("" if fits(row[m], device_bytes) else " ✗")
                 for m in gpus]
        lines.append(f"| {row['d_model']} | 2^{row['n_latents'].bit_length() - 1} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(parts: dict) -> str:
    order = ("parameters", "adam_moments", "gradients", "bf16_copies", "activations", "auxk",
             "optimizer", "counters", "total")
    return "\n".join(f"  {name:<13} {parts[name] / GB:10.2f} GB" for name in order
                     if parts.get(name) or name == "total")


def plan_report(tc, gpus: int | None = None, *, compile_step: bool = False,
                device_gb: float = H200_BYTES / GB) -> str:
    """What ``hsae plan`` prints for the settings ``tc`` on ``gpus`` devices (default: the
    mesh's own size, else this machine's device count)."""
    shape = MeshShape.parse(tc.mesh)
    if gpus is None:
        if shape.data is not None:
            gpus = shape.data * shape.model
        else:
            import jax

            gpus = tc.devices or jax.device_count()
    settings = PlanSettings.from_train_config(tc, gpus)
    parts = memory_plan(settings)
    verdict = (f"fits (under {USABLE_FRACTION:.0%} of the device)"
               if fits(parts["total"], device_gb * GB)
               else f"does NOT fit (over {USABLE_FRACTION:.0%} of the device)")
    lines = [f"F={settings.n_latents} D={settings.d_model} K={settings.k} "
             f"B={settings.batch_size} on mesh data={settings.data},model={settings.model}; "
             f"params {settings.param_dtype}, Adam {settings.adam_dtype}, compute "
             f"{settings.compute_dtype}, AuxK "
             + (f"on (largest bucket {settings.auxk_max_fraction:g} F/m)" if settings.auxk
                else "off"),
             "estimated bytes per device:", describe(parts),
             f"{verdict} in {device_gb:g} GB"]
    if compile_step:
        compiled = compiled_memory(tc, settings.data * settings.model)
        from hsae_jax.backends import resolve_backend

        lines.append(f"XLA on this machine ({compiled['devices']} device(s), "
                     f"{compiled['mesh']}, backend {resolve_backend(tc.backend)}): arguments "
                     f"{compiled['argument'] / GB:.2f} GB + temporaries "
                     f"{compiled['temp'] / GB:.2f} GB = {compiled['total'] / GB:.2f} GB")
    return "\n".join(lines)


def tables_markdown(device_gb: float = H200_BYTES / GB) -> str:
    """The README's two tables: default settings, and the low-memory options."""
    options = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in LOW_MEMORY.items())
    return "\n".join([
        f"Estimated GB per device (✗: over {USABLE_FRACTION:.0%} of {device_gb:g} GB), K=64, "
        "B=4096, every GPU on "
        "`model`; float32 parameters and Adam, AuxK on:", "",
        format_table(plan_table(), device_bytes=device_gb * GB), "",
        f"With {options}:", "",
        format_table(plan_table(**LOW_MEMORY), device_bytes=device_gb * GB)])
