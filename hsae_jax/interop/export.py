"""``export_run``: an hsae-jax run folder -> folders another library loads with its own
loader, one per sparsity budget k, with ``input_scale`` folded into the weights.

    export_run("runs/default", "exports/sl", format="saelens", k=8)        # one folder
    export_run("runs/default", "exports/sl", format="saelens", budgets="4,8,16")
    # -> exports/sl/k4/, k8/, k16/ and exports/sl/hsae_export.json (the index)

The whole export is built in a sibling staging folder and renamed into place, so OUT is
either absent, the old one, or complete; an existing non-empty OUT is replaced only with
``force=True``. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from collections.abc import Sequence

from hsae_jax.interop.dictionary_learning import write_dictionary_learning
from hsae_jax.interop.folding import FOLDING_RULE, fold_input_scale
from hsae_jax.interop.saelens import write_saelens
from hsae_jax.interop.sparsify import write_sparsify
from hsae_jax.io_utils import atomic_write_json
from hsae_jax.model import load_model_files
from hsae_jax.version import __version__

WRITERS = {
    "saelens": write_saelens,
    "sparsify": write_sparsify,
    "dictionary_learning": write_dictionary_learning,
}
FORMATS = tuple(WRITERS)
INDEX = "hsae_export.json"
RUN_FILES = ("cfg.json", "sae.safetensors")


def _integer(name: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def parse_budgets(budgets: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"8,16,32"`` (or a sequence of ints) -> (8, 16, 32), sorted, without repeats."""
    if not isinstance(budgets, str) and not isinstance(budgets, Sequence):
        budgets = (_integer("budgets", budgets),)
    if isinstance(budgets, str):
        parts = [p.strip() for p in budgets.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if not values or len(values) != len(parts):
            raise ValueError(f"budgets={budgets!r} is not a comma-separated list of "
                             "integers (e.g. 8,16,32)")
    else:
        values = [_integer("budgets", v) for v in budgets]
        if not values:
            raise ValueError(f"budgets={budgets!r} must be a non-empty list of integers")
    return tuple(sorted(set(values)))


def _check_budget(name: str, value: int, big_k: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    if value > big_k:
        raise ValueError(f"{name}={value} is larger than the run's K={big_k}: one HSAE "
                         f"serves the budgets 1..{big_k}")


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _read_run(run_dir: str):
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run_dir={run_dir!r} is not a folder")
    missing = [n for n in RUN_FILES if not os.path.isfile(os.path.join(run_dir, n))]
    if missing:
        raise FileNotFoundError(f"run_dir={run_dir!r} has no {' or '.join(missing)}: not an "
                                "hsae-jax run folder (hsae train writes both)")
    cfg, params, stats = load_model_files(run_dir)
    with open(os.path.join(run_dir, "cfg.json")) as f:
        raw_cfg = json.load(f)
    metrics = {}
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    return cfg, params, stats, raw_cfg, metrics


def _names(raw_cfg: dict, model_name: str | None, hook_name: str | None):
    """model and hook names: the arguments, else what the run's cfg.json records."""
    data = raw_cfg.get("data")
    places = [raw_cfg] + ([data] if isinstance(data, dict) else [])
    for place in places:
        model_name = model_name or place.get("model_name") or place.get("model")
        hook_name = hook_name or place.get("hook_name") or place.get("hook")
    return model_name, hook_name


def export_run(run_dir: str, out_dir: str, *, format: str, k: int | None = None,
               budgets: str | Sequence[int] | None = None, force: bool = False,
               model_name: str | None = None, hook_name: str | None = None) -> dict:
    """Exports the run in ``run_dir`` to ``out_dir`` for ``format`` (one of
    :data:`FORMATS`).

    ``k``: one budget, written to ``out_dir`` itself (default: the run's K).
    ``budgets``: several (``"8,16,32"`` or a list), one sub-folder ``k<k>`` each, plus
    the index ``hsae_export.json``. ``model_name``/``hook_name`` go to the format's
    metadata (default: the run's cfg.json entries of that name, if any). Weights are
    float32, folded with :func:`~hsae_jax.interop.folding.fold_input_scale`.

    Returns the export's description (what the index holds; for one budget, its entry).
    Raises ValueError / FileNotFoundError / FileExistsError naming the bad argument.
    """
    if format not in WRITERS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}")
    if k is not None and budgets is not None:
        raise ValueError("give k= (one folder) or budgets= (one sub-folder each), not both")
    cfg, params, stats, raw_cfg, metrics = _read_run(run_dir)
    if budgets is not None:
        values = parse_budgets(budgets)
        for value in values:
            _check_budget("budgets", value, cfg.k)
    else:
        values = (cfg.k if k is None else _integer("k", k),)
        _check_budget("k", values[0], cfg.k)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"out_dir={out_dir!r} exists and is not a folder")
    if _inside(run_dir, out_dir):
        raise ValueError(f"out_dir={out_dir!r} would replace or hold the run folder "
                         f"{run_dir!r}: choose another output folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"out_dir={out_dir!r} exists and is not empty: pass --force "
                              "(force=True) to replace it")

    scale = float(stats["input_scale"])
    folded = fold_input_scale(params, scale)
    model_name, hook_name = _names(raw_cfg, model_name, hook_name)
    fvu_per_k = metrics.get("fvu_per_k")
    entries = []
    staging = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        for value in values:
            folder_name = f"k{value}" if budgets is not None else "."
            fvu = fvu_per_k[value - 1] if fvu_per_k and len(fvu_per_k) >= value else None
            hsae_meta = {
                "exported_by": f"hsae-jax {__version__}",
                "budget_k": value,
                "K": cfg.k,
                "objective": cfg.objective,
                "trained_budgets": list(cfg.budgets) if cfg.budgets else None,
                "input_scale": scale,
                "folding": FOLDING_RULE,
                "fvu_at_k": fvu,
                "fvu_per_k": fvu_per_k,
                "run": os.path.basename(os.path.abspath(run_dir)),
                "data": raw_cfg.get("data"),
            }
            info = {"model_name": model_name, "hook_name": hook_name, "hsae_jax": hsae_meta}
            WRITERS[format](os.path.join(staging, folder_name), folded, value, info)
            entries.append({"k": value, "folder": folder_name, "fvu": fvu})
        index = {
            "format": format,
            "exported_by": f"hsae-jax {__version__}",
            "run": os.path.basename(os.path.abspath(run_dir)),
            "model_name": model_name,
            "hook_name": hook_name,
            "d_model": cfg.d_model,
            "n_latents": cfg.n_latents,
            "K": cfg.k,
            "objective": cfg.objective,
            "input_scale": scale,
            "folding": FOLDING_RULE,
            "budgets": entries,
        }
        if budgets is not None:
            atomic_write_json(os.path.join(staging, INDEX), index)
        _swap_into_place(staging, out_dir, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index if budgets is not None else {**index, **entries[0]}


def _swap_into_place(staging: str, out_dir: str, force: bool) -> None:
    """Renames ``staging`` to ``out_dir``, replacing (then deleting) an existing one."""
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir) and not force:  # filled while we were writing
            raise FileExistsError(f"out_dir={out_dir!r} was filled during the export: "
                                  "pass --force (force=True) to replace it")
        old = f"{os.path.abspath(out_dir).rstrip(os.sep)}.old-export-{os.getpid()}"
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)
