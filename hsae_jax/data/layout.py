"""Where a ``[rows, D]`` matrix lies in a ``.npy`` or ``.safetensors`` file, from its header.

``array_layout`` reads only the header (never the data) and answers the dtype, shape and
byte offset, so that a file can be memory-mapped; every way a file can be wrong is one
line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

import numpy as np

SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
ACTIVATION_DTYPES = ("float16", "bfloat16", "float32", "float64")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name (bfloat16 is ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Layout(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # bytes before the first element


def _float_check(path: str, dtype: np.dtype) -> None:
    if dtype == numpy_dtype("bfloat16") or dtype.kind == "f":
        return
    if dtype.kind == "V" and dtype.itemsize == 2:
        raise ValueError(f"{path}: dtype {dtype.str} (2-byte void): a bfloat16 array saved with "
                         "np.save loses its dtype; store bfloat16 activations as .safetensors "
                         "(or float16 / float32 .npy)")
    if dtype.kind == "c":
        raise ValueError(f"{path}: dtype {dtype}: complex activations are not supported "
                         "(expected float16, bfloat16, float32 or float64)")
    raise ValueError(f"{path}: dtype {dtype}: activations must be float16, bfloat16, "
                     "float32 or float64")


def _npy_layout(path: str, f) -> Layout:
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} (expected 1.0 or 2.0)")
        shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable .npy file ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (pickled data), not a numeric matrix")
    if fortran and len(shape) > 1:
        raise ValueError(f"{path}: stored column-major (fortran_order); save it row-major "
                         "(np.ascontiguousarray)")
    return Layout(np.dtype(dtype), tuple(shape), f.tell())


def _safetensors_layout(path: str, f, size: int, tensor: str | None) -> Layout:
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError(f"{path}: not a safetensors file (header of {n} bytes in a file of "
                         f"{size})")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    names = [k for k in header if k != "__metadata__"]
    if tensor is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds tensors {names}: name one (--data-key)")
        tensor = names[0]
    info = header.get(tensor)
    if not isinstance(info, dict):
        raise ValueError(f"{path}: holds no tensor named {tensor!r} (it has {names})")
    name = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if name is None:
        raise ValueError(f"{path}: tensor {tensor!r} has dtype {info.get('dtype')!r}; "
                         f"activations must be one of {sorted(SAFETENSORS_DTYPES)}")
    dtype, shape = numpy_dtype(name), tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: data_offsets {begin}..{end} do not fit shape {shape} of "
                         f"{name}")
    return Layout(dtype, shape, 8 + n + begin)


def array_layout(path: str, tensor: str | None = None) -> Layout:
    """The layout of the activation matrix in ``path`` (``.npy`` or ``.safetensors``).

    tensor: the tensor's name in a ``.safetensors`` file (None: its only tensor).
    Raises FileNotFoundError or ValueError naming the file: missing, a directory, another
    extension, not the format its name says, a dtype that is not float (complex, integer,
    a bfloat16 ``.npy`` whose dtype was lost), column-major, not 2-D, truncated.
    """
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a .npy / .safetensors file (an "
                         "activation cache directory holds manifest.json)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if not path.endswith((".npy", ".safetensors")):
        raise ValueError(f"data file {path} must end in .npy or .safetensors (or be an "
                         "activation cache directory)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if path.endswith(".npy"):
            layout = _npy_layout(path, f)
        else:
            layout = _safetensors_layout(path, f, size, tensor)
    _float_check(path, layout.dtype)
    if len(layout.shape) != 2:
        raise ValueError(f"{path}: activations must be [N, D], got shape {layout.shape}")
    need = layout.offset + int(np.prod(layout.shape)) * layout.dtype.itemsize
    if size < need:
        raise ValueError(f"{path}: truncated ({size} bytes; its header needs {need} for shape "
                         f"{layout.shape} of {layout.dtype})")
    return layout
