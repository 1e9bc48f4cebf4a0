"""The (data, model) mesh, the shardings of the training state, and batch placement.

Training runs on a 2-D mesh of devices with axes ``data`` and ``model``:

- ``data``: each group of devices along it reads its own rows of every batch; gradients
  are averaged over it (data parallelism, what ``--devices N`` did alone);
- ``model``: the dictionary is split over it. With m devices on ``model`` each holds
  ``W_enc[F/m, :]`` and ``b_enc[F/m]`` (a block of latents, for the encoder),
  ``W_dec[:, D/m]`` (a block of the model dimension, for the decoder loss, which is a
  sum over D), the dead-latent counters of its latents, and the Adam moments of what it
  holds; ``b_dec`` and the input scale are on every device.

:data:`PARAM_SPECS` and :data:`STAT_SPECS` say this once; every tree that holds these
arrays (parameters, gradients, Adam moments, checkpoints) is sharded by
:func:`tree_specs`, which finds the array's name in its tree path. A mesh of one device
(``data=1, model=1``) runs the same code with every collective left out.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

PARAM_SPECS = {"W_enc": P(MODEL, None), "b_enc": P(MODEL), "W_dec": P(None, MODEL),
               "b_dec": P()}
STAT_SPECS = {"input_scale": P(), "tokens_since_fired": P(MODEL)}
_NAMED_SPECS = {**PARAM_SPECS, **STAT_SPECS}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices on each axis; ``data=None``: every device the model axis leaves."""

    data: int | None = None
    model: int = 1

    def __post_init__(self):
        for name in ("data", "model"):
            value = getattr(self, name)
            if value is None and name == "data":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mesh {name}={value!r} must be an int >= 1")

    @classmethod
    def parse(cls, text: str | None) -> MeshShape:
        """``"data=2,model=4"``, ``"model=8"`` (data: the rest) or ``"data=4"``."""
        if text is None or not str(text).strip():
            return cls()
        sizes = {}
        for part in str(text).split(","):
            match = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
            if not match or match.group(1) in sizes:
                raise ValueError(f"--mesh={text!r} must look like data=2,model=4 (axes data "
                                 "and model, each at most once)")
            sizes[match.group(1)] = int(match.group(2))
        return cls(**sizes)

    def resolve(self, devices: int) -> tuple[int, int]:
        """(data, model) on ``devices`` devices (data=None takes all the model axis leaves)."""
        if self.data is None:
            if devices % self.model:
                raise ValueError(f"--mesh model={self.model} does not divide the {devices} "
                                 "device(s) in use")
            return devices // self.model, self.model
        if self.data * self.model > devices:
            raise ValueError(f"--mesh data={self.data},model={self.model} needs "
                             f"{self.data * self.model} devices; {devices} in use")
        return self.data, self.model

    def __str__(self) -> str:
        return f"data={'rest' if self.data is None else self.data},model={self.model}"


@dataclasses.dataclass(frozen=True)
class Axes:
    """What per-device code needs to know of the mesh: the sizes of its two axes.

    Every collective goes through these methods, which leave it out on an axis of size 1,
    so the program of a one-device mesh holds no collective at all.
    """

    data: int = 1
    model: int = 1

    def model_index(self):
        """This device's position on ``model`` (0 on a mesh without a model axis)."""
        return 0 if self.model == 1 else jax.lax.axis_index(MODEL)

    def psum_model(self, x):
        return x if self.model == 1 else jax.lax.psum(x, MODEL)

    def pmax_model(self, x):
        return x if self.model == 1 else jax.lax.pmax(x, MODEL)

    def psum_data(self, x):
        return x if self.data == 1 else jax.lax.psum(x, DATA)

    def pmean_data(self, x):
        return x if self.data == 1 else jax.lax.pmean(x, DATA)

    def psum_all(self, x):
        return self.psum_model(self.psum_data(x))


def check_fits(axes: Axes, cfg, batch_size: int | None = None) -> None:
    """Raises ValueError naming the setting when ``cfg`` (an SAEConfig) and the batch do
    not split over a mesh of ``axes``: F and D over ``model``, the batch over ``data``."""
    f, d = cfg.n_latents, cfg.d_model
    if f % axes.model:
        raise ValueError(f"--n-latents={f} must be a multiple of the mesh's model={axes.model}")
    if d % axes.model:
        raise ValueError(f"--d-model={d} must be a multiple of the mesh's model={axes.model}")
    if batch_size is not None and batch_size % axes.data:
        raise ValueError(f"--batch-size={batch_size} must be a multiple of the mesh's "
                         f"data={axes.data}")


def spec_for(path, leaf) -> P:
    """The PartitionSpec of one array of a state tree: by the last name in its path that
    :data:`PARAM_SPECS` / :data:`STAT_SPECS` know, if the ranks agree; else replicated."""
    for entry in reversed(path):
        name = getattr(entry, "key", None)
        if name in _NAMED_SPECS:
            spec = _NAMED_SPECS[name]
            return spec if len(spec) == np.ndim(leaf) else P()
    return P()


def tree_specs(tree):
    """PartitionSpecs for every array of ``tree`` (params, stats, optimizer state, ...)."""
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def model_sharded(path, leaf) -> bool:
    """Whether this array of a state tree is split over the ``model`` axis."""
    return MODEL in tuple(spec_for(path, leaf))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and where the training state and batches live on it.

    Make one with :func:`make_layout`. ``Layout(mesh)`` takes any mesh with axes
    ``("data", "model")``; a 1-D mesh with the single axis ``"data"`` (the data-parallel
    meshes of earlier versions) is read as ``model=1``.
    """

    mesh: Mesh

    def __post_init__(self):
        names = tuple(self.mesh.axis_names)
        if names == (DATA,):
            devices = np.asarray(self.mesh.devices).reshape(-1, 1)
            object.__setattr__(self, "mesh", Mesh(devices, (DATA, MODEL)))
        elif names != (DATA, MODEL):
            raise ValueError(f"a training mesh has axes ('data', 'model'), got {names}")

    @property
    def axes(self) -> Axes:
        return Axes(data=self.mesh.shape[DATA], model=self.mesh.shape[MODEL])

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def describe(self) -> str:
        a = self.axes
        hosts = len({d.process_index for d in self.mesh.devices.flat})
        where = f" in {hosts} processes" if hosts > 1 else ""
        return f"mesh data={a.data} x model={a.model} ({self.size} device(s){where})"

    def check(self, cfg, batch_size: int | None = None) -> None:
        """Raises ValueError naming the setting when ``cfg`` does not split over the mesh."""
        check_fits(self.axes, cfg, batch_size)

    # ------------------------------------------------------------------ state placement

    def shardings(self, tree):
        """NamedShardings for every array of ``tree`` (see :func:`tree_specs`)."""
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), tree_specs(tree),
                            is_leaf=lambda x: isinstance(x, P))

    def abstract(self, tree):
        """``tree``'s shapes and dtypes with this layout's shardings (what orbax restores
        into: each device reads only its own block)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, self.shardings(tree))

    def place(self, tree):
        """``tree`` moved onto the mesh with this layout's shardings."""
        return jax.device_put(tree, self.shardings(tree))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    # ------------------------------------------------------------------------ batches

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA))

    def process_rows(self, batch_size: int) -> tuple[int, int]:
        """(index, count): this process's rows of a batch are share ``index`` of ``count``
        equal, consecutive shares (what ``RowSource.host_batch`` reads)."""
        index_map = self.batch_sharding.addressable_devices_indices_map((batch_size, 1))
        starts = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
        start, stop = starts[0][0], starts[-1][1]
        if any(a[1] != b[0] for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"{self.describe()}: this process's devices hold rows that are "
                             "not consecutive; order the devices by process")
        share = stop - start
        return start // share, batch_size // share

    def put_batch(self, rows, batch_size: int, staged: bool | None = None) -> jax.Array:
        """A [batch_size, D] global batch on the mesh (rows split over ``data``) from
        ``rows``: the whole batch, or only this process's share of it.

        ``staged``: copy host rows through pinned host memory first (None: where the
        devices are GPUs, :func:`pinned_staging`); the host array may be written again
        once the result's pinned copy is made, i.e. when it is ready.
        """
        sharding = self.batch_sharding
        staging = None if staged is False else pinned_staging(sharding, any_platform=bool(staged))
        if staged and staging is None:
            raise ValueError(f"{self.describe()}: no pinned host memory to stage batches in")
        shape = (batch_size, *rows.shape[1:])
        if jax.process_count() == 1:
            if rows.shape[0] != batch_size:
                raise ValueError(f"a batch of {rows.shape[0]} rows; expected {batch_size}")
            if staging is None or not isinstance(rows, np.ndarray):
                return jax.device_put(rows, sharding)
            return jax.device_put(jax.device_put(rows, staging), sharding)
        index, count = self.process_rows(batch_size)
        share = batch_size // count
        if rows.shape[0] == batch_size:
            rows = rows[index * share:(index + 1) * share]
        elif rows.shape[0] != share:
            raise ValueError(f"this process holds {rows.shape[0]} rows of the batch; "
                             f"expected {share} (or all {batch_size})")
        if staging is None:
            return jax.make_array_from_process_local_data(sharding, np.asarray(rows), shape)
        return jax.device_put(jax.make_array_from_process_local_data(
            staging, np.asarray(rows), shape), sharding)


def pinned_staging(sharding: NamedSharding, any_platform: bool = False
                   ) -> NamedSharding | None:
    """``sharding`` in pinned host memory, where host rows are best copied on their way to
    GPUs, or None (other platforms unless ``any_platform``, or no such memory).

    From pageable memory the CUDA driver copies through small bounce buffers of its own,
    one copy at a time (1.4-2.7 GB/s on the lent H200 host: a [4096, 2304] batch every ~14
    ms whatever its dtype, benchmarks/NOTES.md); a copy into pinned memory is a host
    memcpy, and from there the device's DMA engines take it at PCIe speed.
    """
    device = sharding.mesh.devices.flat[0]
    if not any_platform and device.platform not in ("gpu", "cuda", "rocm"):
        return None
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - a runtime without memory kinds: stage nothing
        return None
    return sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else None


def make_mesh(shape: MeshShape | str | None = None, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh; ``devices``: a count (the first ones) or a list
    (default: every device of every process)."""
    shape = shape if isinstance(shape, MeshShape) else MeshShape.parse(shape)
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(f"--devices={devices}: this process sees {len(available)} "
                             "device(s)")
        chosen = available[:devices]
    else:
        chosen = list(devices)
    data, model = shape.resolve(len(chosen))
    chosen = chosen[:data * model]
    if jax.process_count() > 1 and len(chosen) != len(available):
        raise ValueError(f"with {jax.process_count()} processes the mesh must use all "
                         f"{len(available)} devices; {math.prod((data, model))} asked")
    return Mesh(np.asarray(chosen).reshape(data, model), (DATA, MODEL))


def make_layout(shape: MeshShape | str | None = None, devices=None) -> Layout:
    """:class:`Layout` on :func:`make_mesh` (``devices``: a count or a list)."""
    return Layout(make_mesh(shape, devices))
