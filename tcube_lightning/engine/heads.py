"""Zero-shot heads of merged text towers, interpolated in the experts' weights w.

The head h(w) (normalised class embeddings of the text tower merged at w) is an analytic function of w, so
barycentric interpolation at Chebyshev points of the second kind reproduces it to float32 noise with a handful
of nodes. A few text passes per run then serve every sample of every sample-wise method, instead of a text pass
over all class prompts per sample. With several experts w is a vector and the nodes a tensor-product grid over the
box the run's weights can take (the product of the one-dimensional barycentric formulas). The node count per
dimension is chosen per run: the smallest whose interpolant matches direct text passes at seeded check points within
a tolerance on the logits, among those whose grid has at most ``MAX_GRID`` nodes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NODE_COUNTS = (5, 9, 17, 33)
"""Chebyshev points of the second kind nest for these counts: each set holds the previous one, so a node head
computed for a smaller count is reused, never computed twice."""
MAX_GRID = 1024
"""The most nodes (text passes) a grid may have: 33 per dimension with one expert, 17 with two, 9 with three, 5 with
four (625 text passes of the class prompts, once per run); beyond, heads are direct."""
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
    """h(w) on the box [low, high]^K from the heads at a tensor-product grid of Chebyshev nodes (count^K, classes,
    dim; the first expert's node varying slowest)."""

    low: float
    high: float
    nodes: torch.Tensor
    """The Chebyshev nodes of one dimension."""
    node_heads: torch.Tensor
    experts: int = 1

    def covers(self, weights: float | tuple[float, ...] | list[float]) -> bool:
        """Whether a weight vector (one expert's: a number) lies in the box."""
        values = weights if isinstance(weights, (tuple, list)) else (weights,)
        return all(self.low <= w <= self.high for w in values)

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """Heads (rows, classes, dim) at ``weights`` (rows × experts; one expert's: a vector of rows), renormalised
        per class, in the node heads' dtype and device. The combination runs in float64: float32 sums would round
        differently with the number of BLAS threads (so with the number of processes), float64 ones not visibly once
        cast back."""
        points = weights.detach().double().cpu().reshape(-1, self.experts)
        coefficients = barycentric_matrix(points[:, 0], self.nodes)
        for k in range(1, self.experts):  # the grid's coefficients: the outer product of each dimension's
            coefficients = (coefficients[:, :, None] * barycentric_matrix(points[:, k], self.nodes)[:, None]).flatten(1)
        grid, classes, dim = self.node_heads.shape
        heads = coefficients.to(self.node_heads.device) @ self.node_heads.reshape(grid, classes * dim).double()
        return F.normalize(heads.view(len(points), classes, dim), dim=-1).to(self.node_heads.dtype)


def logit_deviation(heads: torch.Tensor, expected: torch.Tensor, scale: float, seed: int = 0) -> float:
    """The largest change of a logit, scale · cos(f, h), between two sets of heads (…, classes, dim), for
    ``PROBES`` seeded random unit features f: what interpolated heads do to the logits of typical images."""
    generator = torch.Generator().manual_seed(seed)
    probes = F.normalize(torch.randn(PROBES, heads.shape[-1], generator=generator, dtype=torch.float64), dim=-1)
    difference = (heads.double() - expected.double()).cpu()
    return float(scale * (difference @ probes.T).abs().max())


def fit_head_interpolant(
    heads_at: Callable[[list[tuple[float, ...]]], torch.Tensor],
    low: float,
    high: float,
    tolerance: float,
    scale: float,
    seed: int = 0,
    experts: int = 1,
) -> tuple[HeadInterpolant | None, dict]:
    """The interpolant over [low, high]^``experts`` with the fewest nodes per dimension (of ``NODE_COUNTS``, grids of
    at most ``MAX_GRID`` nodes) whose logits (at logit scale ``scale``) are within ``tolerance`` of direct heads' at
    seeded check points in the box; None (use direct heads) if none is. ``heads_at`` takes weight vectors and gives
    their heads (points, classes, dim), each computed once. Returns the interpolant and what was measured, for the
    results."""
    cache: dict[tuple[float, ...], torch.Tensor] = {}

    def heads(points: list[tuple[float, ...]]) -> torch.Tensor:
        missing = [point for point in dict.fromkeys(points) if point not in cache]
        if missing:
            cache.update(zip(missing, heads_at(missing)))
        return torch.stack([cache[point] for point in points])

    box = {"interval": [low, high]} | ({"experts": experts} if experts > 1 else {})
    if high - low <= 0:  # a single weight: its own head is exact
        single = torch.tensor([low], dtype=torch.float64)
        interpolant = HeadInterpolant(low, high, single, heads([(low,) * experts]), experts)
        return interpolant, box | {"nodes": 1, "max_logit_deviation": 0.0, "text_passes": 1}
    generator = torch.Generator().manual_seed(seed)
    checks = low + (high - low) * torch.rand(CHECK_POINTS, experts, generator=generator, dtype=torch.float64)
    expected = heads([tuple(map(float, w)) for w in checks])
    deviation, interpolant = math.inf, None
    for count in (c for c in NODE_COUNTS if c**experts <= MAX_GRID):
        nodes = chebyshev_nodes(low, high, count)
        grid = list(itertools.product(nodes.tolist(), repeat=experts))
        candidate = HeadInterpolant(low, high, nodes, heads(grid), experts)
        deviation = logit_deviation(candidate(checks), expected, scale, seed)
        if deviation <= tolerance:
            interpolant = candidate
            break
    nodes = None if interpolant is None else len(interpolant.nodes)
    return interpolant, box | {"nodes": nodes, "max_logit_deviation": deviation, "text_passes": len(cache)}
