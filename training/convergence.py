"""Did an iterative run converge? A pure reading of its per-epoch history.

A minibatch run converged when it stopped early (its validation loss stopped improving) or
when its loss changed by no more than `MAX_REL_CHANGE` over the last epoch. A run that used
every epoch while its loss still fell faster than that stopped too soon, and says which
option to raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_REL_CHANGE = 0.01


@dataclass(frozen=True)
class Convergence:
    converged: bool
    final_rel_loss_change: float | None
    """(last - previous) / |previous| of the loss over the last epoch (negative: it fell);
    None when a single epoch ran."""
    warning: str | None = None


def minibatch_convergence(history: list[dict[str, Any]], max_epochs: int) -> Convergence:
    """From the per-epoch metrics of a run that allowed `max_epochs` epochs."""
    if not history:
        return Convergence(False, None, "no epoch finished; raise --epochs")
    key = "val_loss" if "val_loss" in history[-1] else "train_loss"
    stopped_early = bool(history[-1].get("stopped_early")) or len(history) < max_epochs
    if len(history) < 2:
        return Convergence(
            stopped_early,
            None,
            None
            if stopped_early
            else f"a single epoch ran, too few to tell whether the {key} settled: raise --epochs",
        )
    previous, last = float(history[-2][key]), float(history[-1][key])
    change = (last - previous) / max(abs(previous), 1e-12)
    if stopped_early or change >= -MAX_REL_CHANGE:
        return Convergence(True, change)
    return Convergence(
        False,
        change,
        f"the {key} still fell {-change:.1%} in the last of {len(history)} epochs: "
        "raise --epochs (or --lr) to let it settle",
    )
