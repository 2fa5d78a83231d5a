"""The embedded demo: a tiny generalist CLIP, an expert fine-tuned from it, and MedMNIST-format test files.

Nothing can be downloaded here, so the demo makes everything it needs, deterministically:
- synthetic 28-px images of ten pattern classes under five acquisition conditions (clean, low
  contrast, noise, blur, dark), each class captioned from its name through prompt templates;
- a *generalist*: the tiny open_clip CLIP ``tcube-tiny-clip`` trained from scratch, image and text
  towers together, to match images with their class captions (cross-entropy of image-to-caption
  similarities over all classes: CLIP's contrastive objective with the class captions as the batch);
- an *expert*: the generalist fine-tuned the same way on six of the classes under one narrow
  condition (noise) only, and a second expert (for runs with several experts, ``configs/demo_experts.yaml``) on the
  same classes under the other conditions (blur, low contrast, darkness);
- test files in MedMNIST's npz layout: ``in_domain`` (the expert's classes and condition) and
  ``shifted`` (the same classes under blur, low contrast and darkness).

Run ``python -m tcube_lightning.data.demo --out artifacts/demo``; ``configs/demo.yaml`` evaluates the result.
Whatever the methods score on it is reported as it comes: the demo exercises the pipeline on a real
generalist/expert trade-off, it is not evidence for the method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import OneCycleLR

from tcube_lightning import loading  # noqa: F401 - registers the bundled tiny architecture
from tcube_lightning.quiet import creating_empty_models

ARCH = "tcube-tiny-clip"
IMAGE_SIZE = 28
CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "dots",
    "checkerboard",
)
EXPERT_CLASSES = CLASSES[:6]
CONDITIONS = ("clean", "low contrast", "noisy", "blurred", "dark")
EXPERT_CONDITION = "noisy"
SHIFTED_CONDITIONS = ("blurred", "low contrast", "dark")
TRAIN_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a picture showing a {}.", "a medical image of a {}.")
CLIP_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
CLIP_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
FORMAT_VERSION = 2
"""2: the second expert (expert_shifted.pt); the generalist and the first expert as in 1."""


def _class_mask(name: str, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Foreground mask (n, H, W) of a class's pattern at random positions, sizes and frequencies."""
    n = x.shape[0]
    cx, cy = (torch.rand(2, n, 1, 1, generator=g) - 0.5) * 0.6
    r = 0.35 + 0.3 * torch.rand(n, 1, 1, generator=g)
    freq = 6 + 6 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    dx, dy = x - cx, y - cy
    d = torch.sqrt(dx**2 + dy**2)
    shapes = {
        "circle": lambda: d < r,
        "square": lambda: torch.maximum(dx.abs(), dy.abs()) < 0.8 * r,
        "triangle": lambda: (dy < 0.7 * r) & (dx.abs() < 0.5 * (dy + r)),
        "cross": lambda: ((dx.abs() < 0.25 * r) & (dy.abs() < r)) | ((dy.abs() < 0.25 * r) & (dx.abs() < r)),
        "ring": lambda: (d < r) & (d > 0.6 * r),
        "horizontal stripes": lambda: torch.sin(freq * y + phase) > 0,
        "vertical stripes": lambda: torch.sin(freq * x + phase) > 0,
        "diagonal stripes": lambda: torch.sin(freq * (x + y) / math.sqrt(2) + phase) > 0,
        "dots": lambda: torch.sin(freq * x + phase) * torch.sin(freq * y + phase) > 0.5,
        "checkerboard": lambda: torch.sin(freq * x + phase) * torch.sin(freq * y + phase) > 0,
    }
    return shapes[name]().float()


def _apply_condition(images: torch.Tensor, condition: str, g: torch.Generator) -> torch.Tensor:
    """An acquisition condition applied to float images (n, 3, H, W) in [0, 1]."""
    if condition == "low contrast":
        images = 0.5 + 0.25 * (images - 0.5)
    elif condition == "noisy":
        images = images + 0.3 * torch.randn(images.shape, generator=g)
    elif condition == "blurred":
        t = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(t**2) / (2 * 1.5**2))
        k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 7, 7)
        images = F.conv2d(F.pad(images, (3, 3, 3, 3), mode="replicate"), k, groups=3)
    elif condition == "dark":
        images = 0.3 * images
    elif condition != "clean":
        raise ValueError(f"unknown condition {condition!r}; known: {CONDITIONS}")
    return images.clamp(0, 1)


def synthesize(
    labels: torch.Tensor, conditions: list[str], g: torch.Generator, classes: tuple[str, ...] = CLASSES
) -> np.ndarray:
    """uint8 RGB images (n, 28, 28, 3) for class indices ``labels``, each under its condition."""
    n = len(labels)
    axis = torch.linspace(-1, 1, IMAGE_SIZE)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = x.expand(n, -1, -1), y.expand(n, -1, -1)
    mask = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        mask[idx] = _class_mask(classes[c], x[idx], y[idx], g)
    foreground = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    background = 0.35 * torch.rand(n, 3, 1, 1, generator=g)
    images = background + (foreground - background) * mask[:, None]
    out = torch.empty_like(images)
    for condition in set(conditions):
        idx = torch.tensor([i for i, c in enumerate(conditions) if c == condition])
        out[idx] = _apply_condition(images[idx], condition, g)
    return (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_clip_input(images: np.ndarray) -> torch.Tensor:
    """The same normalisation as the evaluation transform (at 28 px, resize and crop are identities)."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD


def train_clip(
    model: torch.nn.Module,
    classes: tuple[str, ...],
    conditions: tuple[str, ...],
    steps: int,
    lr: float,
    seed: int,
    name: str = "model",
) -> torch.nn.Module:
    """Train image and text towers to match each image with its class caption (one random template per step).
    Says how far it got every tenth of the steps: on a loaded machine this takes many minutes."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.get_tokenizer(ARCH)
    tokens = tokenizer([t.format(c) for c in classes for t in TRAIN_TEMPLATES]).view(
        len(classes), len(TRAIN_TEMPLATES), -1
    )
    class_ids = torch.tensor([CLASSES.index(c) for c in classes])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    # One cycle with a 10 % warm-up. OneCycleLR divides by the warm-up's length less one step (zero at 10 steps), so
    # runs of fewer than 20 steps, whose warm-up would be under 2 steps, keep the learning rate constant instead.
    schedule = OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1) if steps >= 20 else None
    model.train()
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        labels = torch.randint(len(classes), (128,), generator=g)
        picked = torch.randint(len(conditions), (128,), generator=g).tolist()
        images = _to_clip_input(synthesize(class_ids[labels], [conditions[i] for i in picked], g))
        template = torch.randint(len(TRAIN_TEMPLATES), (len(classes),), generator=g)
        text = model.encode_text(tokens[torch.arange(len(classes)), template], normalize=True)
        logits = model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if step % report_every == 0 or step == steps:
            print(f"demo: training the {name}, step {step}/{steps}, loss {loss.item():.3f}", flush=True)
    return model.eval()


def write_split(path: Path, classes: tuple[str, ...], conditions: tuple[str, ...], per_class: int, seed: int) -> None:
    """One MedMNIST-format npz (``test_images`` uint8 (N, 28, 28, 3), ``test_labels`` uint8 (N, 1))."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    picked = [conditions[i % len(conditions)] for i in range(len(labels))]
    class_ids = torch.tensor([CLASSES.index(c) for c in classes])[labels]
    images = synthesize(class_ids, picked, g)
    np.savez_compressed(path, test_images=images, test_labels=labels.numpy().astype(np.uint8)[:, None])


def build_demo(
    out: Path, generalist_steps: int = 500, expert_steps: int = 150, per_class: int = 83, seed: int = 0
) -> None:
    """Write generalist.pt, expert.pt, expert_shifted.pt, demo_in_domain.npz, demo_shifted.npz and demo.json into
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with creating_empty_models():  # open_clip's note that it is random: it is, and trained next
        untrained = open_clip.create_model(ARCH)
    generalist = train_clip(untrained, CLASSES, CONDITIONS, generalist_steps, 2e-3, seed, name="generalist")
    torch.save(generalist.state_dict(), out / "generalist.pt")
    expert = train_clip(
        copy.deepcopy(generalist), EXPERT_CLASSES, (EXPERT_CONDITION,), expert_steps, 1e-3, seed + 1, name="expert"
    )
    torch.save(expert.state_dict(), out / "expert.pt")
    second = train_clip(
        generalist, EXPERT_CLASSES, SHIFTED_CONDITIONS, expert_steps, 1e-3, seed + 4, name="second expert"
    )
    torch.save(second.state_dict(), out / "expert_shifted.pt")
    write_split(out / "demo_in_domain.npz", EXPERT_CLASSES, (EXPERT_CONDITION,), per_class, seed + 2)
    write_split(out / "demo_shifted.npz", EXPERT_CLASSES, SHIFTED_CONDITIONS, per_class, seed + 3)
    info = {
        "format_version": FORMAT_VERSION,
        "arch": ARCH,
        "classes": EXPERT_CLASSES,
        "seed": seed,
        "generalist_steps": generalist_steps,
        "expert_steps": expert_steps,
        "per_class": per_class,
    }
    (out / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"demo written to {out} in {time.perf_counter() - start:.1f} s")


def demo_is_built(out: Path) -> bool:
    marker = out / "demo.json"
    return marker.is_file() and json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a demo")
    parser.add_argument("--generalist-steps", type=int, default=500)
    parser.add_argument("--expert-steps", type=int, default=150)
    parser.add_argument("--per-class", type=int, default=83, help="test images per class and split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if demo_is_built(args.out) and not args.force:
        print(f"demo already built in {args.out} (use --force to rebuild)")
        return
    build_demo(args.out, args.generalist_steps, args.expert_steps, args.per_class, args.seed)


if __name__ == "__main__":
    main()
