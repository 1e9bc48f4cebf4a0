"""Harvesting activations from a language model into an activation cache.

``harvest(HarvestConfig(model=..., layer=..., data=..., out=...))`` runs a Hugging Face
``transformers`` model (or any callable tokens [n, T] -> activations [n, T, D], e.g. a
JAX function) over text cut into fixed-length contexts and writes the residual stream at
a block as the sharded cache of ``docs/activation-cache.md`` (``hsae_jax.data.cache``),
resumable after a kill. ``hsae harvest`` is the command line. Beside ``data/``, below
the trainer: nothing here imports it.
"""

from hsae_jax.harvest.config import HarvestConfig
from hsae_jax.harvest.run import harvest
from hsae_jax.harvest.text import ContextSpec, read_documents, token_contexts

__all__ = ["ContextSpec", "HarvestConfig", "harvest", "read_documents", "token_contexts"]
