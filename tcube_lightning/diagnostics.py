"""Per-split diagnostics of T³'s coefficient: the paper's decision quadrants and λ's reach.

A torchmetrics ``Metric`` so that, under DDP, every process's samples are gathered in ``compute``.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

QUADRANTS = ("both wrong", "only expert right", "only pretrained right", "both right")


class DecisionDiagnostics(Metric):
    """Counts and mean JS per quadrant (pretrained right/wrong × expert right/wrong), and how many
    samples change prediction between the models merged at the two extreme values of λ."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # Per-sample quadrant and JS rather than running sums: exact means, whatever the split over processes.
        self.add_state("quadrants", [], dist_reduce_fx="cat")
        self.add_state("js", [], dist_reduce_fx="cat")
        self.add_state("flips", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        pt_logits: torch.Tensor,
        ft_logits: torch.Tensor,
        labels: torch.Tensor,
        js: torch.Tensor,
        extreme_predictions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        quadrant = 2 * (pt_logits.argmax(-1) == labels).long() + (ft_logits.argmax(-1) == labels).long()
        self.quadrants.append(quadrant)
        self.js.append(js.detach().double())
        if extreme_predictions is not None:
            low, high = extreme_predictions
            self.flips += (low != high).sum().to(self.flips.dtype)

    def compute(self) -> dict:
        """Quadrant counts and mean JS, flips, and the split's mean JS (``js_mean``; the per-sample JS is kept
        here only). ``math.fsum`` rounds exact sums once: the means do not depend on the split over processes."""
        quadrant, js = (dim_zero_cat(state).cpu() for state in (self.quadrants, self.js))
        quadrants = {}
        for index, name in enumerate(QUADRANTS):
            values = js[quadrant == index].tolist()
            quadrants[name] = {"count": len(values), "js_mean": math.fsum(values) / len(values) if values else math.nan}
        every = js.tolist()
        return {
            "quadrants": quadrants,
            "flips_between_lambda_extremes": int(self.flips),
            "js_mean": math.fsum(every) / len(every) if every else math.nan,
        }


def lambda_spread_warning(coefficients: dict[str, dict[str, float]], min_spread: float) -> str | None:
    """One warning naming the splits where λ barely moves (T³ then acts like a fixed interpolation), or None."""
    narrow = {
        split: stats["lambda_max"] - stats["lambda_min"]
        for split, stats in coefficients.items()
        if stats["lambda_max"] - stats["lambda_min"] < min_spread
    }
    if not narrow:
        return None
    listed = ", ".join(f"{split} ({spread:.4f})" for split, spread in list(narrow.items())[:8])
    more = f" and {len(narrow) - 8} more" if len(narrow) > 8 else ""
    return (
        f"λ spans less than min_lambda_spread={min_spread} on {len(narrow)} split(s): {listed}{more}. T³ behaves "
        "almost like a fixed interpolation there. σ(γ·JS) lies in [0.5, σ(γ·ln 2)] by construction: a larger gamma "
        "or a wider range [lambda_min, lambda_max] widens the spread of λ."
    )
