"""Pictures of a run: FVU against the budget k, and the training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure  # no pyplot: works headless, leaves the backend alone

from hsae_jax.io_utils import atomic_write


def _figure(size):
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def plot_fvu_vs_k(curves: Mapping[str, Sequence[float]], path: str,
                  title: str = "FVU at every budget k") -> None:
    """One line per model: FVU of the reconstruction from its first k latents, k = 1.."""
    fig, ax = _figure((6, 4))
    for label, fvu in curves.items():
        ax.plot(range(1, len(fvu) + 1), fvu, marker="o", markersize=3, label=label)
    ax.set_xlabel("k (latents used)")
    ax.set_ylabel("fraction of variance unexplained")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def plot_training_curves(records: Sequence[dict], path: str) -> None:
    """Loss (and AuxK) against step; evaluation FVU on a second axis."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, ax = _figure((7, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="loss")
    ax.plot(steps, [r["recon_loss"] for r in train], label="reconstruction", alpha=0.7)
    if any(r.get("auxk_loss", 0) for r in train):
        ax.plot(steps, [r["auxk_loss"] for r in train], label="AuxK", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (scaled space)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"]["fvu"] for r in evals], "k--o",
                 markersize=3, label="eval FVU at K")
        ax2.set_ylabel("FVU at K")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="upper right")
    ax.set_title("training")
    _save(fig, path)
