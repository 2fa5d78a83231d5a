"""The documentation's figures, from real runs of the embedded demo (never drawn by hand): builds the demo if needed,
runs configs/demo.yaml and configs/demo_experts.yaml with plots on into a temporary folder, and copies the figures the
pages show into docs/figures/. Run from the repository's root after a change to what the figures show:

    .venv/bin/python docs/make_figures.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tcube_lightning.cli.app import main  # noqa: E402
from tcube_lightning.data import demo  # noqa: E402

FIGURES = {  # (config, the run's plots/ file) → docs/figures/ name
    ("demo.yaml", "accuracy_heatmap.png"): "accuracy_heatmap.png",
    ("demo.yaml", "lambda_histograms.png"): "lambda_histograms.png",
    ("demo.yaml", "in_domain/coefficients.png"): "coefficients.png",
    ("demo.yaml", "shifted/js_vs_dawin.png"): "js_vs_dawin.png",
    ("demo.yaml", "shifted/confidence_vs_js.png"): "confidence_vs_js.png",
    ("demo.yaml", "mixed/risk_coverage.png"): "risk_coverage.png",
    ("demo.yaml", "guarantee.png"): "guarantee.png",
    ("demo_experts.yaml", "expert_weights.png"): "expert_weights.png",
}


def run(config: str, out: Path) -> Path:
    """The demo config run into ``out``; its plots folder."""
    results = out / config.removesuffix(".yaml")
    main(["test", "--config", str(ROOT / "configs" / config), f"--model.results_dir={results}", "--model.plots=true"])
    return results / "plots"


def make_figures(target: Path = ROOT / "docs" / "figures") -> None:
    artifacts = ROOT / "artifacts" / "demo"
    if not demo.demo_is_built(artifacts):
        demo.main(["--out", str(artifacts)])
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tcube_docs_") as folder:
        plots = {config: run(config, Path(folder)) for config in {config for config, _ in FIGURES}}
        for (config, source), name in FIGURES.items():
            shutil.copyfile(plots[config] / source, target / name)
            print(f"docs/figures/{name} from {config}: plots/{source}")


if __name__ == "__main__":
    make_figures()
