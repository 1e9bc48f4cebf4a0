"""Evaluation of an SAE inside its language model.

The SAE's reconstruction at budget k replaces the residual stream at the hooked layer
of a causal LM (``transformers``, torch; the SAE runs in JAX, rows cross through numpy),
and the next-token loss is compared with the clean model and with zero ablation:
cross-entropy, KL to the clean distribution, and the fraction of loss recovered at every
budget. Next to ``evaluate`` (which measures reconstruction error alone); the CLI's
``hsae eval RUN --model ...`` calls :func:`evaluate_in_model`.
"""

from hsae_jax.evaluate_model.run import (
    InModelEvalConfig,
    default_budgets,
    evaluate_in_model,
    in_model_table,
)
from hsae_jax.evaluate_model.splice import (
    identity_reconstruct,
    sae_reconstruct,
    spliced_losses,
    zero_reconstruct,
)

__all__ = ["InModelEvalConfig", "default_budgets", "evaluate_in_model", "identity_reconstruct",
           "in_model_table", "sae_reconstruct", "spliced_losses", "zero_reconstruct"]
