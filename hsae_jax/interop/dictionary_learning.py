"""dictionary_learning (``dictionary-learning`` 0.1.0) folders: export for its
``utils.load_dictionary``.

Written from the 0.1.0 wheel's source (``utils.py``, ``trainers/top_k.py``): a folder
holds ``config.json`` (``{"trainer": {"dict_class": "AutoEncoderTopK", "k": k, ...}}``;
``load_dictionary`` reads only those two keys) and ``ae.pt``, a ``torch.save``d state
dict of ``AutoEncoderTopK``, loaded with ``torch.load`` and a strict ``load_state_dict``:

    encoder.weight [F, D], encoder.bias [F], decoder.weight [D, F] (nn.Linear(F, D)),
    b_dec [D], k (int32 scalar buffer), threshold (float32 scalar buffer; -1 = unset)

Its ``encode(x)`` is ``ReLU(encoder(x - b_dec))``, then ``topk(k, sorted=False)``
scattered into a dense [B, F] tensor; ``decode(f) = decoder(f) + b_dec``. So it is the
same TopK SAE as sparsify's (ReLU before top-k). ``threshold`` is only used with
``encode(use_threshold=True)``; we leave it at -1 (unset). Loading does not renormalise
the decoder, but its ``TopKTrainer`` sets decoder columns to unit norm after every step:
fine-tuning the export there would undo the fold (decoder columns have norm 1/s).

Writing ``ae.pt`` needs torch. The package itself (nnsight < 0.4, a CUDA torch) is not
needed to export.
"""

from __future__ import annotations

import os

import numpy as np

from hsae_jax.interop import _files
from hsae_jax.interop.folding import FoldedSAE
from hsae_jax.io_utils import atomic_write

WEIGHTS = "ae.pt"
CONFIG = "config.json"


def write_dictionary_learning(folder: str, sae: FoldedSAE, k: int, info: dict) -> None:
    """Writes ``folder``/config.json and ae.pt (an AutoEncoderTopK state dict) at budget k.

    ``info``: ``model_name`` and ``hook_name`` go to the trainer config's ``lm_name`` and
    ``submodule_name`` (as dictionary_learning's TopKTrainer records them), ``hsae_jax``
    to a top-level key.
    """
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch comes with the interop extra
        raise ImportError("exporting to dictionary_learning writes a torch file (ae.pt): "
                          "pip install 'hsae-jax[interop]' (or torch)") from err
    state = {
        "k": torch.tensor(int(k), dtype=torch.int32),
        "threshold": torch.tensor(-1.0, dtype=torch.float32),
        "decoder.weight": torch.from_numpy(np.ascontiguousarray(sae.w_dec.T)),  # [D, F]
        "encoder.weight": torch.from_numpy(np.ascontiguousarray(sae.w_enc)),  # [F, D]
        "encoder.bias": torch.from_numpy(np.ascontiguousarray(sae.b_enc)),
        "b_dec": torch.from_numpy(np.ascontiguousarray(sae.b_dec)),
    }
    config = {
        "trainer": {
            "trainer_class": "hsae-jax export",
            "dict_class": "AutoEncoderTopK",
            "activation_dim": sae.d_model,
            "dict_size": sae.n_latents,
            "k": int(k),
            "lm_name": info.get("model_name"),
            "submodule_name": info.get("hook_name"),
            "layer": None,
        },
        "hsae_jax": info["hsae_jax"],
    }
    atomic_write(os.path.join(folder, WEIGHTS), lambda tmp: torch.save(state, tmp))
    _files.write_json(os.path.join(folder, CONFIG), config)
