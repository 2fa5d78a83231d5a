"""What each method costs in a run, measured where it runs: wall time per image (synchronised on CUDA) and
forward-equivalents (that time over the time of one model's forward, from the shared pretrained and expert
forwards). Timings differ from run to run, so they go to cost.json, the console and the logger, never into
results.json, which stays byte-identical across repeats and process counts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter

import torch

SHARED = "shared: pretrained + expert forwards, JS, λ"
DIAGNOSTICS = "diagnostics: models at λ_min and λ_max"


def synchronized_clock(device: torch.device) -> Callable[[], float]:
    """``perf_counter`` that first waits for the device's queued work (CUDA runs asynchronously)."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return perf_counter()

    return now


class CostMeter:
    """Seconds and images per named part of a run (methods, the shared forwards, the diagnostics).

    Args:
        device: Where the run computes (CUDA's queue is waited for before each reading).
        models: How many models the shared part runs: the generalist and each expert.
    """

    def __init__(self, device: torch.device, models: int = 2) -> None:
        self._now = synchronized_clock(device)
        self.models = models
        self.seconds: dict[str, float] = defaultdict(float)
        self.images: dict[str, int] = defaultdict(int)

    @contextmanager
    def measure(self, name: str | None, images: int) -> Iterator[None]:
        """Time the block as part ``name``; None records nothing (a part that does not run in this run)."""
        start = self._now()
        yield
        if name is not None:
            self.seconds[name] += self._now() - start
            self.images[name] += images

    def table(self) -> dict[str, dict[str, float]]:
        """Per part: milliseconds per image and forward-equivalents per image (one forward = the shared part over
        the models it runs: 2 with one expert, K + 1 with K)."""
        per_image = {name: self.seconds[name] / self.images[name] for name in self.seconds if self.images[name]}
        forward = per_image.get(SHARED, 0.0) / self.models
        return {
            name: {"ms_per_image": 1e3 * value, "forward_equivalents": value / forward if forward else float("nan")}
            for name, value in per_image.items()
        }
