"""The embedded demo's full evaluation (every method, both splits) end to end, in images per second, with
today's defaults and with the settings they replaced, side by side in one run (a benchmark, not a test).

- ``before``: exact zero-shot heads (a text pass over every class prompt per merged weight, so per sample for
  the sample-wise methods), as before heads were interpolated;
- ``now``: the defaults (heads from an interpolant in w fitted once per run);
- ``now, no λ-extremes diagnostic``: what its two merged forwards per batch cost;
- ``now, with the γ = 8 grid``: configs/demo.yaml's ``model.grid``, three more T³ columns on the same forwards.

All but the last run without the demo config's grid, and all without AdaMerging's two families (the demo config
evaluates them too: they train at test time, which this benchmark does not measure).

Each setting runs ``--repeats`` times through the real command line in this process; the best time counts.
Accuracies of every setting are compared with ``before`` (they should be identical).

    python benchmarks/bench_demo.py            # builds the demo first if artifacts/demo lacks it
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcube_lightning.cli.app import main as cli_main
from tcube_lightning.data import demo
from tcube_lightning.merging.methods import ONE_EXPERT_DEFAULTS

SETTINGS = {
    "before": ["--model.heads=exact"],
    "now": [],
    "now, no λ-extremes diagnostic": ["--model.diagnose_extremes=false"],
    "now, with the γ = 8 grid": ["--model.grid=[{gamma: 8}]"],
}


def evaluate(extra: list[str], folder: Path) -> tuple[float, dict]:
    """Seconds for one full evaluation of the demo, and its results."""
    args = [
        "test",
        "--config",
        "configs/demo.yaml",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--model.results_dir={folder}",
        "--model.plots=false",
        "--model.overwrite=true",
        "--model.grid=[]",
        f"--model.methods=[{', '.join(ONE_EXPERT_DEFAULTS)}]",
        *extra,
    ]
    start = time.perf_counter()
    cli_main(args)
    seconds = time.perf_counter() - start
    return seconds, json.loads((folder / "results.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest counts")
    args = parser.parse_args(argv)
    if not demo.demo_is_built(Path("artifacts/demo")):
        demo.main(["--out", "artifacts/demo"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SETTINGS.items():
            runs = [evaluate(extra, Path(tmp) / name) for _ in range(args.repeats)]
            seconds, results = min(runs, key=lambda run: run[0])
            rows[name] = {"seconds": seconds, "images": sum(results["num_samples"].values()), "results": results}
    base = rows["before"]
    print("\n| setting | s | images/s | vs before | accuracies as before |\n|---|---:|---:|---:|---|")
    for name, row in rows.items():
        rate = row["images"] / row["seconds"]
        # Neither the diagnostic nor the grid changes an accuracy of the methods "before" has.
        same = all(
            row["results"]["accuracy"][s][m] == a
            for s, per in base["results"]["accuracy"].items()
            for m, a in per.items()
        )
        print(f"| {name} | {row['seconds']:.1f} | {rate:.1f} | {base['seconds'] / row['seconds']:.2f}x | {same} |")
    heads = rows["now"]["results"]["heads"]
    print(f"\nheads: {json.dumps(heads)}")


if __name__ == "__main__":
    main()
