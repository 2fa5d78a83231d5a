"""Per-row merged weights: a Linear or Conv2d leaf whose rows each carry many tokens runs each row through its own
merged weight, W_i = (1 − Σ_k w_ik)·W_pt + Σ_k w_ik·W_k, in one batched product, instead of K + 1 products whose
outputs are mixed (``per_sample.LeafWisePass``). The merged weights are built in chunks of rows inside one reused
workspace."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

PER_ROW_TOKENS = 64
"""The rule between the two ways a leaf of full experts runs per row: a Linear or Conv2d leaf whose rows each carry at
least ``PER_ROW_TOKENS / K`` tokens merges its weight per row (θ_pt + Σ_k w_ik·Δ_k, one batched product) instead of
running K + 1 products and mixing their outputs. Mixing costs K extra products of T tokens per row; merging per row
costs the merged weights' memory traffic (about 4·|W| per row) and a batched product less efficient than one GEMM.
Measured on this project's 2-core CPU (benchmarks/bench_leaf_rule.py, docs/performance.md): break-even at about 64
tokens per row for K = 1, 32 for K = 2, 16 for K = 4, at the tiny models' widths and at ViT-B/16's; a ViT-B/16 block
carries 197 tokens, the tiny CLIP's 50, a text tower 32 to 77."""


def min_tokens(experts: int) -> int:
    """Tokens per row from which a leaf of ``experts`` full experts merges its weights per row."""
    return -(-PER_ROW_TOKENS // experts)


WORKSPACE_ELEMENTS = 2**24
"""The most elements the per-row merged weights of one leaf take at once (64 MiB in float32): rows are merged in
chunks within it, in one buffer reused by every leaf (a fresh allocation per leaf costs page faults on CPU)."""


class RowWeightMerge:
    """Leaves merged per row from the experts' stacked values (experts × shape, views into the store's rows).

    Args:
        stacked: Per changed parameter, every expert's value stacked; empty: no leaf is merged per row.
    """

    def __init__(self, stacked: dict[str, torch.Tensor], threshold: int) -> None:
        self.stacked, self.threshold = stacked, threshold
        self.workspace: torch.Tensor | None = None

    def serves(self, weight_name: str, tokens: int) -> bool:
        """Whether the leaf of ``weight_name`` runs merged per row: its experts' values are stacked and each row
        carries at least ``threshold`` tokens."""
        return weight_name in self.stacked and tokens >= self.threshold

    def __call__(
        self,
        x: torch.Tensor,
        names: tuple[str, str],
        pt: tuple[torch.Tensor, torch.Tensor | None],
        weights: torch.Tensor,
        apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """``apply(rows of x, their weights, their biases)`` with the leaf's (weight, bias) merged per row with
        ``weights`` (rows × experts)."""
        chunks = [apply(x[start : start + len(w)], w, b) for start, w, b in self._row_parameters(names, pt, weights)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def linear(
        self,
        x: torch.Tensor,
        names: tuple[str, str],
        pt: tuple[torch.Tensor, torch.Tensor | None],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """A Linear leaf merged per row; runs of rows with the same weights of equal length (a head's prompts, in the
        text passes that compute heads at many weights) share one merged weight and one product."""
        unique, counts = torch.unique_consecutive(weights, dim=0, return_counts=True)
        if len(unique) == len(weights) or not bool((counts == counts[0]).all()):
            return self(x, names, pt, weights, per_row_linear)
        grouped = x.reshape(len(unique), -1, x.shape[-1])  # each run's rows side by side
        return self(grouped, names, pt, unique, per_row_linear).view(*x.shape[:-1], -1)

    def _row_parameters(
        self, names: tuple[str, str], pt: tuple[torch.Tensor, torch.Tensor | None], weights: torch.Tensor
    ) -> Iterator:
        """(first row, weights, biases) merged per row, in chunks of rows that fit ``WORKSPACE_ELEMENTS``: the weights
        in the shared workspace, so each chunk is used before the next is asked for."""
        weight, bias = pt
        size, count = weight.numel(), len(self.stacked[names[0]])
        chunk = max(1, min(len(weights), WORKSPACE_ELEMENTS // size))
        if self.workspace is None or self.workspace.numel() < chunk * size or self.workspace.device != weight.device:
            self.workspace = weight.new_empty(chunk * size)
        experts = self.stacked[names[0]].view(count, -1)
        biases = None if bias is None else self.stacked.get(names[1], bias.expand(count, -1))
        for start in range(0, len(weights), chunk):
            w = weights[start : start + chunk].to(weight.dtype)
            keep = 1.0 - w.sum(dim=1)
            rows = torch.outer(keep, weight.view(-1), out=self.workspace[: len(w) * size].view(len(w), size))
            rows.addmm_(w, experts)
            row_bias = None if bias is None else torch.outer(keep, bias).addmm_(w, biases)
            yield start, rows.view(len(w), *weight.shape), row_bias


def per_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Row i of ``x`` (rows, …, in) through ``weight[i]`` (rows, out, in) and ``bias[i]``: one batched product."""
    flat = x.reshape(len(x), -1, x.shape[-1])
    if bias is None:
        y = torch.bmm(flat, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.view(*x.shape[:-1], -1)
