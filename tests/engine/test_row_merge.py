"""The per-row weight merge's two parts on their own: each row's merged weight against the formula in float64, and the
runs of equal rows a text pass at many weights shares."""

import pytest
import torch

from helpers import sum_atol
from tcube_lightning.engine.row_merge import equal_runs, merge_rows


@pytest.mark.parametrize("count", [1, 2, 4])
def test_each_rows_weight_is_the_generalist_plus_its_weighted_task_vectors(count):
    generator = torch.Generator().manual_seed(count)
    pt, experts = torch.randn(300, generator=generator), torch.randn(count, 300, generator=generator)
    weights = torch.rand(5, count, generator=generator) / count
    weights[0] = 0.0
    rows = merge_rows(pt, experts, weights, 1.0 - weights.sum(dim=1), torch.empty(5, 300))
    expected = pt.double() + weights.double() @ (experts.double() - pt.double())
    torch.testing.assert_close(rows.double(), expected, atol=sum_atol(expected, 2 * (count + 1)), rtol=0)
    assert torch.equal(rows[0], pt)  # a row at zero weights is the generalist, exactly


def test_rows_in_runs_of_one_length_share_their_weights():
    heads = torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.1, 0.2]])  # three heads' weights; the first and last equal
    runs = heads.repeat_interleave(4, dim=0)  # each head's four prompts side by side
    assert torch.equal(equal_runs(runs), heads)
    assert equal_runs(heads) is None  # every row its own: no runs
    assert equal_runs(heads.repeat_interleave(torch.tensor([2, 4, 2]), dim=0)) is None  # runs of different lengths
    assert equal_runs(heads[:1].expand(6, 2)) is not None  # one run: all rows share one merge
