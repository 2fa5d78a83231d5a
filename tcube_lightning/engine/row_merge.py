"""Per-row merged weights: a Linear or Conv2d leaf whose rows each carry many tokens runs each row through its own
merged weight, W_i = (1 − Σ_k w_ik)·W_pt + Σ_k w_ik·W_k, in one batched product, instead of K + 1 products whose
outputs are mixed (``per_sample.LeafWisePass``). The merged weights are built in chunks of rows inside one reused
workspace."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

PER_ROW_TOKENS = 64
"""The rule between the two ways a leaf of full experts runs per row: a Linear or Conv2d leaf whose rows each carry at
least ``PER_ROW_TOKENS / K`` tokens (``ONE_EXPERT_TOKENS`` for one expert) merges its weight per row (θ_pt + Σ_k
w_ik·Δ_k, one batched product) instead of running K + 1 products and mixing their outputs. Mixing costs K extra
products of T tokens per row; merging per row costs the merged weights' memory traffic (one ``lerp`` pass over |W|
per row with one expert, a scaled copy and a product over the experts with more) and a batched product less efficient
than one GEMM. Measured on this project's 2-core CPU (benchmarks/bench_leaf_rule.py, docs/performance.md): break-even
at about 50 tokens per row for K = 1 (32 to 64 across widths 64 to 768), 32 for K = 2, 16 for K = 4; a ViT-B/16
block carries 197 tokens, a ViT-B/32's and the tiny CLIP's 50, a text tower 32 to 77."""

ONE_EXPERT_TOKENS = 48
"""The rule's threshold with one expert, whose per-row merge is a single ``lerp`` pass (``merge_rows``)."""


def min_tokens(experts: int) -> int:
    """Tokens per row from which a leaf of ``experts`` full experts merges its weights per row."""
    return ONE_EXPERT_TOKENS if experts == 1 else -(-PER_ROW_TOKENS // experts)


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
        ``weights`` (rows × (experts + 1): each expert's weight, then the generalist's 1 − Σ_k w_ik)."""
        chunks = [apply(x[start : start + len(w)], w, b) for start, w, b in self._row_parameters(names, pt, weights)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def linear(
        self,
        x: torch.Tensor,
        names: tuple[str, str],
        pt: tuple[torch.Tensor, torch.Tensor | None],
        weights: torch.Tensor,
        runs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A Linear leaf merged per row; where the rows come in ``runs`` of equal weights (a head's prompts, in the
        text passes that compute heads at many weights: ``runs`` holds each run's weights, as ``weights``), each run
        shares one merged weight and one product."""
        if runs is None:
            return self(x, names, pt, weights, per_row_linear)
        grouped = x.reshape(len(runs), -1, x.shape[-1])  # each run's rows side by side
        return self(grouped, names, pt, runs, per_row_linear).view(*x.shape[:-1], -1)

    def _workspace(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """The shared workspace, grown to ``size`` elements on ``like``'s device where it is smaller or elsewhere."""
        if self.workspace is None or self.workspace.numel() < size or self.workspace.device != like.device:
            self.workspace = like.new_empty(size)
        return self.workspace

    def _row_parameters(
        self, names: tuple[str, str], pt: tuple[torch.Tensor, torch.Tensor | None], weights: torch.Tensor
    ) -> Iterator:
        """(first row, weights, biases) merged per row, in chunks of rows that fit ``WORKSPACE_ELEMENTS``: the weights
        in the shared workspace, so each chunk is used before the next is asked for. Under ``torch.compile`` the
        compiler plans the memory: a fresh tensor per chunk, as a shared workspace's size would be one more guard
        to recompile on."""
        weight, bias = pt
        size, count = weight.numel(), len(self.stacked[names[0]])
        chunk = max(1, min(len(weights), WORKSPACE_ELEMENTS // size))
        workspace = (
            weight.new_empty(chunk * size) if torch.compiler.is_compiling() else self._workspace(chunk * size, weight)
        )
        experts = self.stacked[names[0]].view(count, -1)
        biases = None if bias is None else self.stacked.get(names[1], bias.expand(count, -1))
        for start in range(0, len(weights), chunk):
            w = weights[start : start + chunk].to(weight.dtype)
            rows = workspace[: len(w) * size].view(len(w), size)
            merge_rows(weight.view(-1), experts, w, rows)
            row_bias = None if bias is None else merge_rows(bias, biases, w, bias.new_empty(len(w), len(bias)))
            yield start, rows.view(len(w), *weight.shape), row_bias


def merge_rows(pt: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Row i of ``out`` = keep_i·pt + Σ_k w_ik·experts[k], ``weights`` row i holding w_i1 … w_iK then keep_i =
    1 − Σ_k w_ik (made once per pass, not per leaf). With one expert one ``lerp`` (one pass writing the rows, as the
    store's merge: θ_pt + w·Δ); with more a scaled copy and one product over the experts (measured quicker on this
    CPU than a chain of lerps at ViT-B/16's widths, docs/performance.md)."""
    if len(experts) == 1:
        rows = (len(weights), pt.numel())
        return torch.lerp(pt.expand(rows), experts[0].expand(rows), weights[:, :1], out=out)
    torch.outer(weights[:, -1], pt, out=out)
    return out.addmm_(weights[:, :-1], experts)


def per_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Row i of ``x`` (rows, …, in) through ``weight[i]`` (rows, out, in) and ``bias[i]``: one batched product."""
    flat = x.reshape(len(x), -1, x.shape[-1])
    if bias is None:
        y = torch.bmm(flat, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.view(*x.shape[:-1], -1)
