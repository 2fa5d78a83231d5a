"""AdaMerging (Yang et al., ICLR 2024) with one expert: merging coefficients learnt at test time by minimising the
entropy of the merged model's zero-shot predictions on the split's own unlabelled images.

θ(λ) = θ_pt + λ·(θ_ft − θ_pt) over every parameter tensor of the image tower (as the original merges every float
entry of the image encoder; the text tower stays the generalist's, whose zero-shot head classifies): one λ for all
tensors (task-wise) or one per tensor, weights and biases apart (layer-wise). Adam on the mean Shannon entropy of
softmax(logit scale · cos), the original's defaults: 500 steps of 16 images, learning rate 1e-3, λ from 0.3,
clamped to [0, 1] after each step. The forward keeps λ in the graph: ``torch.func.functional_call`` on the merged
tensors, recomputed every step, as FusionBench does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tcube_lightning.errors import InputError

IMAGE_TOWER = "visual."
REFERENCE = "AdaMerging (Yang et al., ICLR 2024)"


@dataclass(frozen=True)
class AdaMergingSettings:
    """AdaMerging's options (the original's defaults).

    Args:
        steps: Optimiser steps per adaptation.
        lr: Adam's learning rate.
        batch_size: Images per step.
        init: λ before the first step.
        clamp: Clamp λ to [0, 1] after each step (the original does; FusionBench by default does not).
        seed: Seed of the order the images are drawn in.
        adapt_on: A split to adapt on once, whose coefficients every split then uses; None: each split adapts on
            its own images before its evaluation (the method's transductive protocol).
        threads: torch's CPU threads during the adaptation; None keeps the run's. On a machine other work keeps
            busy, torch's default (one per core) can run each step an order of magnitude slower than one thread
            (benchmarks/bench_adamerging.py): give 1 there.
    """

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    init: float = 0.3
    clamp: bool = True
    seed: int = 0
    adapt_on: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("steps", "batch_size")
            if getattr(self, name) < 1
        ]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not math.isfinite(self.init):
            problems.append(f"init must be finite, got {self.init}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 (or null: the run's), got {self.threads}")
        if problems:
            raise InputError("model.adamerging: " + "; ".join(problems))


@dataclass
class Adaptation:
    """What an adaptation learnt: the coefficients, experts × (one, or one per image-tower tensor by name), and the
    entropy at each step (before that step's update)."""

    names: list[str]
    coefficients: torch.Tensor
    entropy: list[float]
    experts: list[str] | None = None
    """The experts' names with several (their coefficients recorded by name); None with one."""

    def record(self) -> dict:
        def per_tensor(values: list[float]) -> float | dict[str, float]:
            return values[0] if len(values) == 1 else dict(zip(self.names, values, strict=True))

        rows = self.coefficients.tolist()
        if self.experts is None:
            return {"coefficients": per_tensor(rows[0]), "entropy": self.entropy}
        coefficients = {name: per_tensor(values) for name, values in zip(self.experts, rows, strict=True)}
        return {"coefficients": coefficients, "entropy": self.entropy, "experts": self.experts}


def batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The images of ``dataset``'s samples (dicts with an ``image``), endlessly, in the order AdaMerging draws them:
    epoch e shuffled by ``torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + e))``, in
    batches of ``batch_size`` (the last one of an epoch smaller). Every process draws the same ones."""
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        for batch in DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size):
            yield batch["image"]
        epoch += 1


def adapt(
    pretrained: nn.Module,
    experts: list[dict[str, torch.Tensor]],
    head: torch.Tensor,
    images: Iterator[torch.Tensor],
    layer_wise: bool,
    settings: AdaMergingSettings,
    check: Callable[[], None] = lambda: None,
    names: list[str] | None = None,
) -> Adaptation:
    """Learn λ (experts × (one, or one per tensor)) on ``images`` (on the models' device); ``head``: the zero-shot
    class embeddings that classify; ``check`` is called before each step (it raises to stop the adaptation: a run's
    SIGTERM); ``names``: the experts', with several. Runs with gradients on, also inside Lightning's test loop, which
    runs without."""
    device = next(pretrained.parameters()).device
    pt = {n: p for n, p in pretrained.named_parameters() if n.startswith(IMAGE_TOWER)}
    with torch.inference_mode(False), torch.enable_grad():
        deltas = [{n: (expert[n] - p).detach() for n, p in pt.items()} for expert in experts]
        base = {n: p.detach().clone() for n, p in pt.items()}
        classes, scale = head.detach().clone(), pretrained.logit_scale.detach().exp()
        shape = (len(experts), len(pt) if layer_wise else 1)
        lam = torch.full(shape, settings.init, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([lam], lr=settings.lr)
        curve = []
        for _, batch in zip(range(settings.steps), images):
            check()
            entropy = mean_entropy(merged_logits(pretrained, base, deltas, lam, batch.to(device), classes, scale))
            optimiser.zero_grad()
            entropy.backward()
            optimiser.step()
            if settings.clamp:
                with torch.no_grad():
                    lam.clamp_(0.0, 1.0)
            curve.append(float(entropy.detach()))
    return Adaptation(list(pt), lam.detach().clone(), curve, names if len(experts) > 1 else None)


def merged_logits(
    pretrained: nn.Module,
    base: dict,
    deltas: list[dict],
    lam: torch.Tensor,
    images: torch.Tensor,
    head: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Zero-shot logits of the image tower at θ_pt + Σ_k λ_k·Δ_k, tensor by tensor, λ kept in the graph."""
    params = {}
    for i, name in enumerate(base):
        value = base[name]
        for k, delta in enumerate(deltas):
            value = value + lam[k, i % lam.shape[1]] * delta[name]
        params[name.removeprefix(IMAGE_TOWER)] = value
    features = torch.func.functional_call(pretrained.visual, params, (images,), strict=False)
    return scale * F.normalize(features, dim=-1) @ head.T


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean Shannon entropy of softmax(logits)."""
    log_p = torch.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def merged_flat(store: nn.Module, adaptation: Adaptation) -> torch.Tensor:
    """The adapted model as the store's flat parameter vector (the image tower merged, the rest the generalist's),
    for ``store.load``."""
    flat = store.pt_flat.clone()
    experts = [store.expert_parameters(k) for k in range(store.count)]
    lam = adaptation.coefficients.to(flat)
    for i, name in enumerate(adaptation.names):
        offset, size = store.offsets[name], store.shapes[name].numel()
        pt = flat[offset : offset + size].clone()
        value = pt
        for k, ft in enumerate(experts):
            value = value + lam[k, i % lam.shape[1]] * (ft[name].reshape(-1) - pt)
        flat[offset : offset + size] = value
    return flat
