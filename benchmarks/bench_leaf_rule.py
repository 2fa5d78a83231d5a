"""The per-sample pass's rule, measured: for a Linear leaf of a given width, batch and number of full experts K, the
time of the output mix (K + 1 products, outputs mixed per row) against the per-row weight merge (each row's weight
θ_pt + Σ_k w_ik·Δ_k built, then one batched product), as tokens per row grow. The break-even tokens per row it prints
are what ``engine/row_merge.py``'s ``PER_ROW_TOKENS`` rests on (docs/performance.md). A benchmark, not a test:
the two strategies run through the engine's own leaf code (``LeafWisePass`` on a one-layer model).

    python benchmarks/bench_leaf_rule.py --widths 64 768 --experts 1 2 4 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcube_lightning.engine import row_merge
from tcube_lightning.engine.per_sample import LeafWisePass

TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 50, 77, 197)


class OneLeaf(nn.Module):
    """A model of one Linear leaf (width → 4·width, as a ViT's MLP), enough for the leaf-wise pass."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def seconds(run, repeats: int = 5, min_time: float = 0.2) -> float:
    """The median over ``repeats`` of the mean time of ``run`` over at least ``min_time`` seconds."""
    run()
    times = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time or count == 0:
            run()
            count += 1
        times.append(elapsed / count)
    return statistics.median(times)


def measure(width: int, experts: int, batch: int, tokens: int) -> tuple[float, float]:
    """(output mix, per-row weight merge) seconds for one pass of the leaf over a batch."""
    torch.manual_seed(0)
    model = OneLeaf(width).eval().requires_grad_(False)
    values = {
        n: torch.stack([p + 0.01 * torch.randn_like(p) for _ in range(experts)]) for n, p in model.named_parameters()
    }
    dense = [{n: v[k] for n, v in values.items()} for k in range(experts)]
    x = torch.randn(batch, tokens, width)
    weights = torch.rand(batch, experts) / experts
    results = []
    for per_row in (False, True):
        leafwise = LeafWisePass(model, dense, None, values if per_row else None)
        leafwise.row_weights.threshold = 0 if per_row else 10**9

        def run(leafwise=leafwise) -> None:
            leafwise.weights = weights
            leafwise.modules["fc"].forward = leafwise.forwards["fc"]
            try:
                with torch.no_grad():
                    model.fc(x)
            finally:
                leafwise.modules["fc"].__dict__.pop("forward", None)

        results.append(seconds(run))
    return results[0], results[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 768])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("width  K  tokens  output mix (ms)  weights per row (ms)  mix / per row")
    for width in args.widths:
        for experts in args.experts:
            even = None
            for tokens in args.tokens:
                mix, per_row = measure(width, experts, args.batch, tokens)
                print(
                    f"{width:5d} {experts:2d} {tokens:7d} {1e3 * mix:16.3f} {1e3 * per_row:21.3f} {mix / per_row:14.2f}"
                )
                if even is None and mix > per_row:
                    even = tokens
            rule = row_merge.min_tokens(experts)
            print(f"break-even [width {width} K={experts}]: {even} tokens per row (the rule: {rule})")


if __name__ == "__main__":
    main()
