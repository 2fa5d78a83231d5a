"""Per-split diagnostics of T³'s coefficient: the paper's decision quadrants and λ's reach.

A torchmetrics ``Metric`` so that, under DDP, the counts are summed over processes in ``compute``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

QUADRANTS = ("both wrong", "only expert right", "only pretrained right", "both right")


class DecisionDiagnostics(Metric):
    """Counts and mean JS per quadrant (pretrained right/wrong × expert right/wrong), and how many
    samples change prediction between the models merged at the two extreme values of λ."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("js_sums", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")
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
        self.counts += torch.bincount(quadrant, minlength=4).to(self.counts.dtype)
        self.js_sums += torch.zeros_like(self.js_sums).index_add_(0, quadrant, js.to(self.js_sums.dtype))
        if extreme_predictions is not None:
            low, high = extreme_predictions
            self.flips += (low != high).sum().to(self.flips.dtype)

    def compute(self) -> dict:
        means = torch.where(self.counts > 0, self.js_sums / self.counts.clamp_min(1), torch.nan)
        quadrants = {
            name: {"count": int(self.counts[i]), "js_mean": float(means[i])} for i, name in enumerate(QUADRANTS)
        }
        return {"quadrants": quadrants, "flips_between_lambda_extremes": int(self.flips)}


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
        "almost like a fixed interpolation there. σ(γ·JS) lies in [0.5, σ(γ·ln 2)] by construction: raise gamma "
        "or narrow lambda_min/lambda_max to change that."
    )
