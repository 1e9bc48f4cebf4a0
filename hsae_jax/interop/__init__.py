"""Exports to, and imports from, other SAE libraries' folder formats.

One module per format (:mod:`.saelens`, :mod:`.sparsify`, :mod:`.dictionary_learning`),
all folding the run's ``input_scale`` into the weights by the one rule in
:mod:`.folding`; :func:`export_run` (``hsae export``) writes one folder per budget k,
:mod:`.verify` checks an export with the target library itself, and
:func:`from_saelens` / :func:`from_sparsify` open their TopK SAEs as
:class:`~hsae_jax.HierarchicalTopKSAE`. The libraries themselves are needed only to
verify an export (``pip install 'hsae-jax[interop]'``); torch only for
dictionary_learning's ``ae.pt``.
"""

from hsae_jax.interop.export import FORMATS, INDEX, export_run, parse_budgets
from hsae_jax.interop.folding import FOLDING_RULE, FoldedSAE, fold_input_scale
from hsae_jax.interop.saelens import from_saelens
from hsae_jax.interop.sparsify import from_sparsify
from hsae_jax.interop.verify import BudgetCheck, verify_export

__all__ = [
    "FOLDING_RULE",
    "FORMATS",
    "INDEX",
    "BudgetCheck",
    "FoldedSAE",
    "export_run",
    "fold_input_scale",
    "from_saelens",
    "from_sparsify",
    "parse_budgets",
    "verify_export",
]
