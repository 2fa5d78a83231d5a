"""Zero-shot heads of merged text towers, interpolated in the expert weight w.

The head h(w) (normalised class embeddings of the text tower merged at w) is an analytic function of w, so
barycentric interpolation at Chebyshev points of the second kind reproduces it to float32 noise with a handful
of nodes. A few text passes per run then serve every sample of every sample-wise method, instead of a text pass
over all class prompts per sample. The node count is chosen per run: the smallest count whose interpolant
matches direct text passes at seeded check points within a tolerance on the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NODE_COUNTS = (5, 9, 17, 33)
"""Chebyshev points of the second kind nest for these counts: each set holds the previous one, so a node head
computed for a smaller count is reused, never computed twice."""
CHECK_POINTS = 7
PROBES = 256
"""Seeded random unit features through which a head's deviation is measured as a change of logits."""


def chebyshev_nodes(low: float, high: float, count: int) -> torch.Tensor:
    """Chebyshev points of the second kind (the extrema of T_{count-1}) on [low, high], in float64."""
    if count == 1:
        return torch.tensor([low], dtype=torch.float64)
    angles = torch.arange(count, dtype=torch.float64) * math.pi / (count - 1)
    return (low + high) / 2 + (high - low) / 2 * torch.cos(angles)


def barycentric_matrix(points: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """(len(points), len(nodes)) coefficients of the barycentric formula for Chebyshev points of the second kind
    (node weights (−1)^j, halved at both ends); a point on a node takes that node's value exactly."""
    count = len(nodes)
    weights = torch.where(torch.arange(count) % 2 == 0, 1.0, -1.0).to(torch.float64)
    if count > 1:
        weights[0] /= 2
        weights[-1] /= 2
    difference = points.to(torch.float64)[:, None] - nodes[None, :]
    on_node = difference == 0
    terms = weights / torch.where(on_node, 1.0, difference)
    terms = torch.where(on_node.any(1, keepdim=True), on_node.to(torch.float64), terms)
    return terms / terms.sum(1, keepdim=True)


@dataclass(frozen=True)
class HeadInterpolant:
    """h(w) on [low, high] from the heads at Chebyshev nodes (count, classes, dim)."""

    low: float
    high: float
    nodes: torch.Tensor
    node_heads: torch.Tensor

    def covers(self, weight: float) -> bool:
        return self.low <= weight <= self.high

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """Heads (len(weights), classes, dim), renormalised per class, in the node heads' dtype and device. The
        combination runs in float64: float32 sums would round differently with the number of BLAS threads (so
        with the number of processes), float64 ones not visibly once cast back."""
        coefficients = barycentric_matrix(weights.detach().double().cpu(), self.nodes).to(self.node_heads.device)
        count, classes, dim = self.node_heads.shape
        heads = coefficients @ self.node_heads.reshape(count, classes * dim).double()
        return F.normalize(heads.view(len(weights), classes, dim), dim=-1).to(self.node_heads.dtype)


def logit_deviation(heads: torch.Tensor, expected: torch.Tensor, scale: float, seed: int = 0) -> float:
    """The largest change of a logit, scale · cos(f, h), between two sets of heads (…, classes, dim), for
    ``PROBES`` seeded random unit features f: what interpolated heads do to the logits of typical images."""
    generator = torch.Generator().manual_seed(seed)
    probes = F.normalize(torch.randn(PROBES, heads.shape[-1], generator=generator, dtype=torch.float64), dim=-1)
    difference = (heads.double() - expected.double()).cpu()
    return float(scale * (difference @ probes.T).abs().max())


def fit_head_interpolant(
    head_at: Callable[[float], torch.Tensor],
    low: float,
    high: float,
    tolerance: float,
    scale: float,
    seed: int = 0,
) -> tuple[HeadInterpolant | None, dict]:
    """The interpolant with the fewest nodes (of ``NODE_COUNTS``) whose logits (at logit scale ``scale``) are
    within ``tolerance`` of direct heads' at seeded check points in [low, high]; None (use direct heads) if
    none is. Returns it and what was measured, for the results."""
    cache: dict[float, torch.Tensor] = {}

    def head(weight: float) -> torch.Tensor:
        if weight not in cache:
            cache[weight] = head_at(weight)
        return cache[weight]

    if high - low <= 0:  # a single weight: its own head is exact
        interpolant = HeadInterpolant(low, high, torch.tensor([low], dtype=torch.float64), head(low)[None])
        return interpolant, {"interval": [low, high], "nodes": 1, "max_logit_deviation": 0.0, "text_passes": 1}
    generator = torch.Generator().manual_seed(seed)
    checks = low + (high - low) * torch.rand(CHECK_POINTS, generator=generator, dtype=torch.float64)
    expected = torch.stack([head(float(w)) for w in checks])
    deviation = math.inf
    for count in NODE_COUNTS:
        nodes = chebyshev_nodes(low, high, count)
        interpolant = HeadInterpolant(low, high, nodes, torch.stack([head(float(w)) for w in nodes]))
        deviation = logit_deviation(interpolant(checks), expected, scale, seed)
        if deviation <= tolerance:
            break
    else:
        interpolant = None
    nodes = None if interpolant is None else len(interpolant.nodes)
    summary = {"interval": [low, high], "nodes": nodes, "max_logit_deviation": deviation, "text_passes": len(cache)}
    return interpolant, summary
