"""AuxK's column bucket for each training step, chosen on the host.

AuxK computes on a static bucket of columns that holds every dead latent
(:mod:`hsae_jax.parallel.auxk`). Found on the device, the bucket costs the step seven
``lax.cond``s, each a round trip to the host that stalls the GPU (0.3-0.38 ms apiece on an
H100, benchmarks/cond_cost.py). The trainer instead compiles one step per bucket it needs
(``auxk_bucket``, static) and picks it here, with no conditional in the step:

- each step reports ``auxk_bound``: the most latents a device can have dead
  ``BOUND_LAG_STEPS`` (2) steps later, counting every latent that would be dead by then if
  none fired (firing only revives, so this is a true upper bound);
- the loop reads it when it dispatches that later step, while the step in between is still
  queued on the device, so the device never waits for the host;
- the bucket taken is the smallest that holds the bound. A bucket larger than the dead
  count gives the same loss and gradients (its extra columns are padding), and every step
  also reports ``auxk_fits`` (its bucket held its dead latents), checked as it is read.

The bound is loose only for latents within one batch of ``dead_tokens``; with a realistic
``dead_tokens`` (millions of tokens, hundreds of steps) it is the dead count.

Resume stays bit-exact (the bucket sets the padding, hence the reduction order): the
checkpoint saves the bound for its first step, and the next step's is the restored
counters' bound one step ahead, what the uninterrupted run read from the step before.
"""

from __future__ import annotations

import jax
import numpy as np

from hsae_jax.auxk import static_bucket_index
from hsae_jax.parallel.auxk import BOUND_LAG_STEPS, auxk_buckets
from hsae_jax.parallel.mesh import Axes

METRIC_KEYS = ("auxk_bound", "auxk_fits")  # the step's metrics this reads (not logged)


def host_dead_bound(dead_tokens: int, axes: Axes, tokens_since_fired: np.ndarray,
                    tokens_per_step: int, steps_ahead: int) -> int:
    """:func:`hsae_jax.parallel.auxk.dead_bound` on the host, from the whole [F] counters
    (device j of ``model`` holds the j-th of m equal blocks)."""
    blocks = np.asarray(tokens_since_fired).reshape(axes.model, -1)
    soon = blocks >= dead_tokens - steps_ahead * tokens_per_step
    return int(soon.sum(axis=1).max())


class AuxKBuckets:
    """The static ``auxk_bucket`` of each step of a run (0 while no latent can be dead).

    cfg: the SAEConfig; axes: the mesh's axes; tokens_per_step: the global batch;
    tokens_since_fired: the [F] counters the run starts from (host values); start: its
    first step; saved_bound: the bound the checkpoint saved for ``start`` (None: a fresh
    run or an older checkpoint). ``log`` hears when a step for a new bucket is taken (it
    compiles once).
    """

    def __init__(self, cfg, axes: Axes, tokens_per_step: int, tokens_since_fired: np.ndarray,
                 start: int, saved_bound: int | None = None, log=None):
        self.buckets = auxk_buckets(cfg, axes) if cfg.auxk_coef > 0 else ()
        self.log = log
        ahead = [host_dead_bound(cfg.dead_tokens, axes, tokens_since_fired, tokens_per_step, j)
                 for j in range(BOUND_LAG_STEPS)]
        # the saved bound is what the uninterrupted run took at ``start``; a checkpoint
        # whose counters were changed since holds more dead latents than it says
        ahead[0] = max(ahead[0], saved_bound or 0)
        self.bounds = {start + j: b for j, b in enumerate(ahead)}
        self.reports: dict[int, tuple] = {}  # step -> its (auxk_bound, auxk_fits) arrays
        self.taken: set[int] = set()

    def record(self, step: int, metrics: dict) -> dict:
        """Keeps ``step``'s bound and fit report (not yet read: no wait; none kept without
        AuxK, whose steps have nothing to report); returns the metrics without them."""
        metrics = dict(metrics)
        report = tuple(metrics.pop(k) for k in METRIC_KEYS)
        if self.buckets:
            self.reports[step] = report
        return metrics

    def _read(self, step: int) -> None:
        bound, fits = jax.device_get(self.reports.pop(step))
        if not bool(fits):
            raise RuntimeError(f"step {step} ran AuxK on a bucket smaller than its dead latents "
                               "(a bug in the bucket bound): its AuxK loss left some out")
        self.bounds[step + BOUND_LAG_STEPS] = int(bound)

    def bound(self, step: int) -> int:
        """The bound on ``step``'s dead count (waits for the step that reports it)."""
        if step not in self.bounds:
            self._read(step - BOUND_LAG_STEPS)
        return self.bounds[step]

    def bucket(self, step: int) -> int:
        """``step``'s static bucket index (1-based into the buckets; 0: no AuxK work)."""
        if not self.buckets:
            return 0
        bound = self.bound(step)
        self.bounds.pop(step)
        which = static_bucket_index(self.buckets, bound)
        if which not in self.taken and which > 0 and self.log is not None:
            self.log(f"step {step}: up to {bound} latents a device may be dead: AuxK on "
                     f"{self.buckets[which - 1]} columns a device (its step compiles once)")
        self.taken.add(which)
        return which

    def saved(self, next_step: int) -> int:
        """The bound to save with a checkpoint whose first step is ``next_step``; checks
        the steps reported so far."""
        bound = self.bound(next_step) if self.buckets else 0
        self.check()
        return bound

    def check(self) -> None:
        """Reads every report kept (waits for those steps): raises if a bucket was short."""
        for step in sorted(self.reports):
            self._read(step)
