"""The picture of an in-model evaluation: fraction of loss recovered (and KL) against k."""

from __future__ import annotations

from matplotlib.figure import Figure  # no pyplot: works headless, leaves the backend alone

from hsae_jax.io_utils import atomic_write


def plot_loss_recovered_vs_k(result: dict, path: str) -> None:
    """Fraction of loss recovered at each budget k (left axis) and the KL divergence to
    the clean model (right axis, log), from :func:`evaluate_in_model`'s result."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    budgets = result["budgets"]
    recovered = [float("nan") if r is None else r for r in result["loss_recovered"]]
    ax.plot(budgets, recovered, "o-", markersize=4, label="loss recovered")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(k) for k in budgets])
    ax.minorticks_off()
    ax.set_xlabel("k (latents used)")
    ax.set_ylabel("fraction of loss recovered")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(budgets, result["kl"], "s--", color="tab:red", markersize=3, label="KL to clean")
    ax2.set_ylabel("KL(clean || spliced), nats")
    if min(result["kl"]) > 0:
        ax2.set_yscale("log")
    lines, labels = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines + more[0], labels + more[1], loc="center right")
    ax.set_title(f"SAE spliced into {result['model'].rstrip('/').split('/')[-1]}, "
                 f"{result['hook']} layer {result['layer']}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight",
                                               format="png"))
