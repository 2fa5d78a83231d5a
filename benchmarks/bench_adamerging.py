"""AdaMerging's adaptation step on the demo's models, in milliseconds per step, with torch on 1 and on 2 threads, on
an idle machine and under load (a benchmark, not a test).

The load is ``--load`` processes of pure-Python busy loops, started here and stopped after each measurement (what
other work on a shared machine looks like to torch's thread pool). Settings are measured interleaved, ``--repeats``
times each, and the median counts. Prints a table and, per setting, ``adamerging step [threads=<t> load=<n>]:
<ms> ms`` for scripts.

    python benchmarks/bench_adamerging.py            # builds the demo first if artifacts/demo lacks it
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcube_lightning.data import demo
from tcube_lightning.engine.zero_shot import tokenize_prompts, zero_shot_head
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.adamerging import AdaMergingSettings, adapt


def busy() -> None:
    while True:
        pass


def step_ms(pretrained: nn.Module, expert: nn.Module, head: torch.Tensor, images: torch.Tensor, steps: int) -> float:
    batches = iter([images] * steps)
    start = time.perf_counter()
    adapt(
        pretrained,
        [dict(expert.named_parameters())],
        head,
        batches,
        layer_wise=False,
        settings=AdaMergingSettings(steps=steps),
    )
    return 1e3 * (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--steps", type=int, default=20, help="adaptation steps per measurement")
    parser.add_argument("--load", type=int, default=2, help="busy processes of the loaded measurements")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.demo / "expert.pt").is_file():
        demo.build_demo(args.demo)
    pretrained = load_clip(demo.ARCH, args.demo / "generalist.pt")
    expert = load_clip(demo.ARCH, args.demo / "expert.pt")
    tokens = tokenize_prompts(demo.open_clip.get_tokenizer(demo.ARCH), list(demo.EXPERT_CLASSES), ["a photo of a {}."])
    with torch.no_grad():
        head = zero_shot_head(pretrained, tokens, len(demo.EXPERT_CLASSES))
    images = torch.randn(16, 3, demo.IMAGE_SIZE, demo.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    settings = [(threads, load) for load in (0, args.load) for threads in (1, 2)]
    times: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
    for _ in range(args.repeats):
        for threads, load in settings:
            workers = [multiprocessing.Process(target=busy, daemon=True) for _ in range(load)]
            for worker in workers:
                worker.start()
            torch.set_num_threads(threads)
            try:
                times[(threads, load)].append(step_ms(pretrained, expert, head, images, args.steps))
            finally:
                for worker in workers:
                    worker.terminate()
                    worker.join()
    print(f"\nAdaMerging (task-wise) on the demo's models, batch 16, {args.steps} steps, median of {args.repeats}")
    print("| torch threads | busy processes | ms per step |\n|---:|---:|---:|")
    for (threads, load), values in times.items():
        print(f"| {threads} | {load} | {statistics.median(values):.1f} |")
    print()
    for (threads, load), values in times.items():
        print(f"adamerging step [threads={threads} load={load}]: {statistics.median(values):.1f} ms")


if __name__ == "__main__":
    main()
