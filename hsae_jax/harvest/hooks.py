"""Hook points of a Hugging Face transformer: read or replace the residual stream at a block.

Hook names: ``resid_post`` is the output of block L (``hidden_states[L + 1]`` of
``output_hidden_states=True``, except after the last block, where Hugging Face applies
the final norm first); ``resid_pre`` is the input of block L (``hidden_states[L]``). The
blocks are found as the model's ``ModuleList`` of ``num_hidden_layers`` modules
(``transformer.h`` in GPT-2, ``model.layers`` in Llama, ``encoder.layer`` in BERT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from hsae_jax.harvest.config import HOOKS

_BLOCK_LIST_NAMES = ("h", "layers", "layer", "blocks")


def find_blocks(model):
    """The ``torch.nn.ModuleList`` of the model's transformer blocks."""
    import torch

    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in _BLOCK_LIST_NAMES:
            if n_layers is None or len(module) == n_layers:
                found.append((name, module))
    if not found:
        raise ValueError(f"{type(model).__name__}: found no list of transformer blocks (a "
                         f"ModuleList named one of {_BLOCK_LIST_NAMES} with num_hidden_layers="
                         f"{n_layers} entries)")
    return found[0][1]


def block_at(model, layer: int, hook: str):
    if hook not in HOOKS:
        raise ValueError(f"hook={hook!r} must be one of {HOOKS}")
    blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer={layer} is out of range: {type(model).__name__} has "
                         f"{len(blocks)} blocks (0..{len(blocks) - 1})")
    return blocks[layer]


class _Stop(Exception):
    """Raised by a capturing hook to end the forward pass early."""


def _first(value):
    return value[0] if isinstance(value, tuple | list) else value


def _with_first(value, new):
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


@contextlib.contextmanager
def patch_hook(model, layer: int, hook: str, fn: Callable):
    """Within the block, ``fn(hidden [n, T, D] tensor) -> tensor or None`` sees the
    residual stream at the hook point on every forward; a tensor it returns replaces it."""
    block = block_at(model, layer, hook)
    if hook == "resid_post":
        def post(module, args, output):
            new = fn(_first(output))
            return None if new is None else _with_first(output, new)

        handle = block.register_forward_hook(post)
    else:
        def pre(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class TorchActivations:
    """tokens [n, T] int -> activations [n, T, D] float32 numpy, at a hook point of a
    torch transformer; the forward pass stops right after the hook point."""

    def __init__(self, model, layer: int, hook: str = "resid_post", device=None):
        self.model, self.layer, self.hook = model, layer, hook
        block_at(model, layer, hook)  # checks layer and hook now
        self.device = device if device is not None else next(model.parameters()).device

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        seen = []

        def grab(hidden):
            seen.append(hidden)
            raise _Stop

        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
        with torch.inference_mode(), patch_hook(self.model, self.layer, self.hook, grab):
            try:
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            except _Stop:
                pass
        if not seen:
            raise RuntimeError(f"{type(self.model).__name__}: the forward pass never reached "
                               f"block {self.layer}")
        return seen[0].float().cpu().numpy()
