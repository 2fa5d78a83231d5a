"""Interpolated zero-shot heads: the barycentric formula against NumPy, and the fit's node count and tolerance."""

import numpy as np
import pytest
import torch

from helpers import rounding_atol
from tcube_lightning.engine.heads import (
    MAX_GRID,
    HeadInterpolant,
    barycentric_matrix,
    chebyshev_nodes,
    fit_head_interpolant,
)


def test_chebyshev_points_of_the_second_kind():
    expected = 0.25 + 0.5 * (np.polynomial.chebyshev.chebpts2(9) + 1) / 2  # mapped from [-1, 1] to [0.25, 0.75]
    ours = np.sort(chebyshev_nodes(0.25, 0.75, 9).numpy())
    np.testing.assert_allclose(ours, expected, atol=rounding_atol(1.0, torch.float64))


def test_the_barycentric_formula_reproduces_polynomials_of_lower_degree():
    nodes = chebyshev_nodes(-0.3, 1.2, 9)
    polynomial = np.polynomial.Polynomial([0.3, -1.0, 2.0, 0.5, -0.7, 0.1, 0.0, 0.9])  # degree 7 < 9 nodes
    points = torch.linspace(-0.3, 1.2, 31, dtype=torch.float64)
    values = barycentric_matrix(points, nodes) @ torch.from_numpy(polynomial(nodes.numpy()))
    np.testing.assert_allclose(values.numpy(), polynomial(points.numpy()), atol=rounding_atol(10.0, torch.float64))
    on_nodes = barycentric_matrix(nodes[[2, 5]], nodes)  # a point on a node takes that node's value
    assert on_nodes.tolist() == torch.eye(9, dtype=torch.float64)[[2, 5]].tolist()


def rotating_heads(weights: tuple[float, ...]) -> torch.Tensor:
    """Unit class embeddings turning smoothly with w (2 classes, 3 dims): an analytic h(w); with several experts'
    weights, each turning them at its own rate."""
    weight = sum(w * (1 + 0.4 * k) for k, w in enumerate(weights))
    angle = torch.tensor([0.7 * weight, 1.3 * weight + 0.2], dtype=torch.float64)
    heads = torch.stack([torch.cos(angle), torch.sin(angle), 0.1 * torch.ones(2)], dim=-1)
    return torch.nn.functional.normalize(heads, dim=-1).float()


def batch_of(head, calls: list | None = None):
    """``head`` over a list of weight vectors, each call recorded in ``calls``."""

    def heads(points):
        (calls if calls is not None else []).extend(points)
        return torch.stack([head(point) for point in points])

    return heads


def test_the_fit_takes_the_fewest_nodes_within_tolerance_and_computes_no_head_twice():
    calls = []
    interpolant, summary = fit_head_interpolant(batch_of(rotating_heads, calls), 0.0, 1.0, 1e-4, 100.0)
    assert summary["nodes"] == 9 and summary["max_logit_deviation"] <= 1e-4
    assert len(calls) == len(set(calls)) == summary["text_passes"] == 7 + 9  # check points, then nested nodes
    ours = interpolant(torch.tensor([0.1, 0.55, 0.93]))
    expected = torch.stack([rotating_heads((w,)) for w in (0.1, 0.55, 0.93)])
    assert float((ours - expected).abs().max()) * 100.0 <= 1e-4
    tight, tight_summary = fit_head_interpolant(batch_of(rotating_heads), 0.0, 1.0, 1e-12, 100.0)
    assert tight is None and tight_summary["nodes"] is None  # unreachable in float32: direct heads instead


def test_a_single_weight_needs_one_head():
    interpolant, summary = fit_head_interpolant(batch_of(rotating_heads), 0.4, 0.4, 1e-4, 100.0)
    assert summary["nodes"] == 1 and isinstance(interpolant, HeadInterpolant)
    torch.testing.assert_close(interpolant(torch.tensor([0.4]))[0], rotating_heads((0.4,)))


@pytest.mark.parametrize("experts", [2, 3])
def test_several_experts_interpolate_on_a_tensor_product_grid(experts):
    """h(w) of a weight vector from the grid of Chebyshev nodes over the box, against direct heads at seeded points."""
    calls = []
    interpolant, summary = fit_head_interpolant(batch_of(rotating_heads, calls), 0.0, 0.3, 1e-4, 100.0, experts=experts)
    assert summary["experts"] == experts and summary["nodes"] ** experts <= MAX_GRID
    assert len(calls) == len(set(calls)) == summary["text_passes"]
    points = 0.3 * torch.rand(20, experts, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.stack([rotating_heads(tuple(map(float, w))) for w in points])
    assert float((interpolant(points) - expected).abs().max()) * 100.0 <= 1e-4
    assert interpolant.covers(tuple(points[0].tolist())) and not interpolant.covers((0.1,) * (experts - 1) + (0.31,))
