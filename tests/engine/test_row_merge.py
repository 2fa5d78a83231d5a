"""The per-row weight merge on its own: each row's merged weight against the formula in float64."""

import pytest
import torch

from helpers import sum_atol
from tcube_lightning.engine.per_sample import with_complement
from tcube_lightning.engine.row_merge import merge_rows


@pytest.mark.parametrize("count", [1, 2, 4])
def test_each_rows_weight_is_the_generalist_plus_its_weighted_task_vectors(count):
    generator = torch.Generator().manual_seed(count)
    pt, experts = torch.randn(300, generator=generator), torch.randn(count, 300, generator=generator)
    weights = torch.rand(5, count, generator=generator) / count
    weights[0] = 0.0
    rows = merge_rows(pt, experts, with_complement(weights), torch.empty(5, 300))
    expected = pt.double() + weights.double() @ (experts.double() - pt.double())
    torch.testing.assert_close(rows.double(), expected, atol=sum_atol(expected, 2 * (count + 1)), rtol=0)
    assert torch.equal(rows[0], pt)  # a row at zero weights is the generalist, exactly
