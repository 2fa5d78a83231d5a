"""T³ against T³_B and against a per-sample reference, side by side in one run (a benchmark, not a test).

For each model and expert kind (a full fine-tuned copy, or a rank-16 LoRA on every qkv of the image tower):
- T³ / T³_B: throughput of T³ (each sample its own merge, through the run's engine, on the path ``samplewise:
  auto`` takes) over that of T³_B (one merge per batch at the mean λ), measured interleaved (T³_B, T³, T³_B, T³,
  …) so that the machine's load falls on both alike; the median ratio of the repeats, with their spread;
- T³ / reference: over a per-sample reference loop (a state_dict merge, ``load_state_dict`` and a text pass per
  sample, as DaWin's code does), which also gives the largest |logit| difference of T³ from per-sample merges;
- peak memory over one model's parameters of T³_B and T³, each measured in a process of its own;
- the merge T³_B and every static method pay: the store's fused merge against its bandwidth floor (one ``torch.add``
  over as many floats) and a state_dict merge with ``load_state_dict`` against the fused one.
Every T³ and T³_B figure includes the pretrained and expert forwards that give λ; zero-shot heads come from
interpolants fitted once (untimed, as a run does in its set-up). Models have random weights: ``clip-tiny``
(the bundled tcube-tiny-clip), ``clip-b16`` (open_clip's ViT-B-16), ``biomedclip-tiny`` (timm's test_vit and a
2-layer BERT) and ``biomedclip-base`` (ViT-B/16 and BERT-base: BiomedCLIP's sizes). Besides its table it prints,
per row, ``T3 vs T3_B [<model> <expert kind>]: <ratio>x``, ``max |logit diff| vs per-sample merges [<model>
<expert kind>]: <value>``, ``fused merge vs bandwidth floor [<model> <expert kind>]: <ratio>x`` and ``state_dict
merge vs fused merge [<model> <expert kind>]: <ratio>x``, for scripts to compare runs.

    python benchmarks/bench_merging.py --rows biomedclip-base:full biomedclip-base:lora --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import clip_logits, zero_shot_head
from tcube_lightning.loading.architecture import image_side
from tcube_lightning.loading.lora import LoraAdapter, LowRankUpdate
from tcube_lightning.merging.coefficients import LambdaMapping
from tcube_lightning.quiet import creating_empty_models

ROWS = (
    "clip-tiny:full",
    "biomedclip-tiny:full",
    "biomedclip-tiny:lora",
    "clip-b16:full",
    "biomedclip-base:full",
    "biomedclip-base:lora",
)
DEFAULT_ROWS = ROWS[:3]
BATCH = {"clip-tiny": 32, "biomedclip-tiny": 32, "clip-b16": 8, "biomedclip-base": 8}
CLIP = {"clip-tiny": "tcube-tiny-clip", "clip-b16": "ViT-B-16"}
MAPPING = LambdaMapping(gamma=50.0)
"""γ large enough that every sample gets its own weight, as with real disagreement."""
LORA_RANK = 16
BIOMEDCLIP = {  # the timm tower and its image size, the BERT sizes, the embedding width
    "biomedclip-tiny": (
        "test_vit",
        160,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        32,
    ),
    "biomedclip-base": ("vit_base_patch16_224", 224, {}, 512),
}


# --------------------------------------------------------------------------------------------------------- models
def build(model: str, kind: str, classes: int, device: str) -> tuple[torch.nn.Module, object, torch.Tensor]:
    """Generalist, expert (a full model or a LoraAdapter) and class prompt tokens, seeded."""
    torch.manual_seed(0)
    if model in CLIP:
        import open_clip

        from tcube_lightning import loading  # noqa: F401 - registers tcube-tiny-clip

        with creating_empty_models():
            pretrained = open_clip.create_model(CLIP[model])
        tokens = open_clip.get_tokenizer(CLIP[model])([f"a photo of a class number {c}." for c in range(classes)])
    else:
        pretrained, tokens = biomedclip(model, classes)
    pretrained = pretrained.eval().requires_grad_(False)
    if kind == "lora":
        g = torch.Generator().manual_seed(1)
        updates = [
            LowRankUpdate(
                f"visual.trunk.blocks.{i}.attn.qkv.weight",
                0.02 * torch.randn(LORA_RANK, block.attn.qkv.in_features, generator=g),
                0.02 * torch.randn(block.attn.qkv.out_features, LORA_RANK, generator=g),
                1.0,
            )
            for i, block in enumerate(pretrained.visual.trunk.blocks)
        ]
        return pretrained.to(device), LoraAdapter("LoRA (benchmark)", "random", updates), tokens.to(device)
    expert = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p_ft in expert.parameters():
            p_ft.add_(0.02 * p_ft.abs().mean() * torch.randn_like(p_ft))
    return pretrained.to(device), expert.to(device), tokens.to(device)


def biomedclip(model: str, classes: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A BiomedCLIP-shaped open_clip model (timm ViT, Hugging Face BERT) with random weights, from a local-dir:
    config written here, and random word-piece prompts ([CLS] … [SEP], padded with 0)."""
    import open_clip
    from transformers import BertConfig

    timm_name, size, bert_sizes, embed_dim = BIOMEDCLIP[model]
    with tempfile.TemporaryDirectory(prefix="bench_biomedclip_") as name:  # read while the model is built only
        folder = Path(name)
        BertConfig(**bert_sizes).save_pretrained(folder / "bert")
        text = {
            "hf_model_name": str(folder / "bert"),
            "hf_tokenizer_name": str(folder / "bert"),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 32,
        }
        vision = {
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": size,
        }
        (folder / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}})
        )
        with creating_empty_models():
            pretrained = open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False)
    lengths = torch.randint(4, 12, (classes,), generator=torch.Generator().manual_seed(2))
    tokens = torch.zeros(classes, 32, dtype=torch.long)
    for c, length in enumerate(lengths.tolist()):
        tokens[c, : length + 2] = torch.cat(
            [torch.tensor([101]), torch.randint(1000, 30000, (length,)), torch.tensor([102])]
        )
    return pretrained, tokens


# ---------------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn, device: str, calls: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: make the peak resident set (VmHWM) restart from the current size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class Row:
    """One model and expert kind: the engine as a run builds it, and the three computations compared."""

    def __init__(self, args: argparse.Namespace, row: str, reference: bool = True) -> None:
        self.model, self.kind = row.split(":")
        self.args, self.device = args, args.device
        self.batch = args.batch_size or BATCH[self.model]
        pretrained, expert, tokens = build(self.model, self.kind, args.classes, self.device)
        self.param_bytes = sum(p.numel() * p.element_size() for p in pretrained.parameters())
        if reference:  # three more copies of the parameters: left out where peak memory is measured
            full_expert = expert.expert(pretrained) if isinstance(expert, LoraAdapter) else expert
            self.reference_states = (copy.deepcopy(pretrained.state_dict()), copy.deepcopy(full_expert.state_dict()))
            self.reference_model = copy.deepcopy(pretrained)
            del full_expert
        self.engine = TCubeEngine(
            pretrained,
            expert,
            [tokens],
            [args.classes],
            MAPPING,
            samplewise="auto",
            compile=args.compile,
            heads="interpolated",
        )
        self.tokens = tokens
        size = image_side(pretrained.visual.image_size)
        self.images = torch.randn(self.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(self.device)
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
        with torch.no_grad(), self.autocast:
            self.engine.prepare({}, extremes=False, weight_range=MAPPING.weight_range())

    def t3_batch(self) -> torch.Tensor:
        with torch.no_grad(), self.autocast:
            weights = self.engine.coefficients(self.images, 0).weights[""]
            return self.engine.merged_logits(self.images, float(weights.mean()))

    def t3(self) -> torch.Tensor:
        with torch.no_grad(), self.autocast:
            return self.engine.sample_merged_logits(self.images, self.engine.coefficients(self.images, 0).weights[""])

    def reference(self) -> torch.Tensor:
        """Per sample: the state_dict merge, load_state_dict, a text pass for the head, the image forward."""
        pt, ft = self.reference_states
        with torch.no_grad(), self.autocast:
            weights = self.engine.coefficients(self.images, 0).weights[""]
            logits = []
            for image, w in zip(self.images, weights.tolist()):
                self.reference_model.load_state_dict(
                    {k: w * ft[k] + (1 - w) * pt[k] if pt[k].is_floating_point() else pt[k] for k in pt}
                )
                head = zero_shot_head(self.reference_model, self.tokens, self.args.classes)
                logits.append(clip_logits(self.reference_model, image[None], head)[0])
            return torch.stack(logits)

    def measure(self) -> dict:
        """Interleaved timings, the reference, the logit difference (peak memory comes from ``peak``)."""
        self.t3_batch(), self.t3()  # warm-up (and compilation)
        calls = max(1, math.ceil(self.args.min_time / max(seconds_per_call(self.t3_batch, self.device, 1), 1e-9)))
        ratios, batch_seconds, t3_seconds = [], [], []
        for _ in range(self.args.repeats):
            batch_seconds.append(seconds_per_call(self.t3_batch, self.device, calls))
            t3_seconds.append(seconds_per_call(self.t3, self.device, calls))
            ratios.append(batch_seconds[-1] / t3_seconds[-1])  # throughput of T³ over that of T³_B
        reference_seconds = seconds_per_call(self.reference, self.device, 1)
        merge = self.merge_times()
        difference = float((self.t3().float() - self.reference().float()).abs().max())
        return {
            "row": f"{self.model}:{self.kind}",
            "batch_size": self.batch,
            "path": self.engine.samplewise_summary(),
            "t3_vs_t3_batch": {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "repeats": len(ratios),
                "calls_per_repeat": calls,
            },
            "t3_batch_images_per_s": self.batch / statistics.median(batch_seconds),
            "t3_images_per_s": self.batch / statistics.median(t3_seconds),
            "t3_vs_reference": reference_seconds / statistics.median(t3_seconds),
            "max_abs_logit_diff_vs_per_sample_merges": difference,
            "param_bytes": self.param_bytes,
            "merge": merge,
        }

    def merge_times(self) -> dict:
        """What T³_B and every static method pay per merge: the store's fused merge (alternating weights, so that each
        call computes), its bandwidth floor (one ``torch.add`` over as many floats) and a state_dict merge with
        ``load_state_dict``, interleaved; medians of the repeats, in seconds."""
        store = self.engine.store
        floats = getattr(store, store.merged_buffers[0]).numel()  # every parameter, or a LoRA expert's targets
        a, b, out = (torch.randn(floats, generator=torch.Generator().manual_seed(i)).to(self.device) for i in range(3))
        weights = itertools.cycle((0.3, 0.7))
        pt, ft = self.reference_states
        paths = {
            "fused": lambda: store.merge(next(weights)),
            "floor": lambda: torch.add(a, b, alpha=0.3, out=out),
            "state_dict": lambda: self.reference_model.load_state_dict(
                {k: torch.lerp(pt[k], ft[k], 0.3) if pt[k].is_floating_point() else pt[k] for k in pt}
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        with torch.no_grad():
            once = {name: max(seconds_per_call(function, self.device, 1), 1e-9) for name, function in paths.items()}
            calls = {name: max(1, math.ceil(self.args.min_time / 10 / once[name])) for name in paths}
            for _ in range(self.args.repeats):
                for name, function in paths.items():
                    seconds[name].append(seconds_per_call(function, self.device, calls[name]))
        return {"floats": floats, **{f"{name}_s": statistics.median(values) for name, values in seconds.items()}}


def peak(args: argparse.Namespace, row: str, path: str) -> int:
    """Peak memory while ``path`` runs, models included: CUDA's max_memory_allocated, or on CPU the peak resident
    set less the process's size before the models are built (coarser), after a garbage collection so that memory freed
    on the way does not count against the row."""
    gc.collect()
    base = current_rss()
    measured = Row(args, row, reference=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    for _ in range(2):
        getattr(measured, path)()
    sync(args.device)
    return torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else peak_rss() - base


def isolated_peak(argv: list[str], row: str, path: str) -> int:
    done = subprocess.run([sys.executable, __file__, *argv, "--peak", f"{row}/{path}"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{row} {path} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(DEFAULT_ROWS), help="model:expert kind")
    parser.add_argument("--batch-size", type=int, help="default: 32, 8 for the ViT-B/16 models")
    parser.add_argument("--classes", type=int, default=8, help="classes (one prompt each) of the zero-shot head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="run the forwards under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="run the forwards through torch.compile")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved T3_B / T3 measurements per row")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds each measurement runs at least")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON table")
    parser.add_argument("--no-isolate", action="store_true", help="peak memory in this process (coarser, quicker)")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # internal: row/path, measured in a subprocess
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.peak:
        print(peak(args, *args.peak.split("/")))
        return
    results = []
    for row in args.rows:
        result = Row(args, row).measure()
        for path in ("t3_batch", "t3"):
            bytes_ = peak(args, row, path) if args.no_isolate else isolated_peak(argv, row, path)
            result[f"{path}_peak_over_params"] = bytes_ / result["param_bytes"]
        results.append(result)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "bf16": args.bf16,
        "compile": args.compile,
        "classes": args.classes,
        "rows": results,
    }
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_" + "_".join(r.replace(":", "-") for r in args.rows) + f"_{args.device.replace(':', '')}"
    name += f"_batch{args.batch_size}" if args.batch_size else ""
    name += ("_bf16" if args.bf16 else "") + ("_compile" if args.compile else "") + ".json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out / name}")


def print_report(report: dict) -> None:
    precision = ("bf16 autocast" if report["bf16"] else "fp32") + (", torch.compile" if report["compile"] else "")
    print(f"\n{report['device']}, {report['classes']} classes, {precision}, merged text tower, interpolated heads")
    print(
        "| model | expert | batch | T3 path | T3 / T3_B (median [min, max]) | T3 / reference | max logit diff "
        "| peak / params T3_B, T3 | fused merge / floor | state_dict merge / fused |\n"
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    for row in report["rows"]:
        model, kind = row["row"].split(":")
        ratio, path = row["t3_vs_t3_batch"], row["path"]
        label = f"{path['path']} ({path.get('pass', path.get('reason'))})"
        print(
            f"| {model} | {kind} | {row['batch_size']} | {label} | {ratio['median']:.2f} [{ratio['min']:.2f}, "
            f"{ratio['max']:.2f}] of {ratio['repeats']} | {row['t3_vs_reference']:.2f} "
            f"| {row['max_abs_logit_diff_vs_per_sample_merges']:.1e} "
            f"| {row['t3_batch_peak_over_params']:.2f}, {row['t3_peak_over_params']:.2f} "
            f"| {merge_vs_floor(row):.2f} | {state_dict_vs_fused(row):.1f} |"
        )
    print()
    for row in report["rows"]:
        model, kind = row["row"].split(":")
        print(f"T3 vs T3_B [{model} {kind}]: {row['t3_vs_t3_batch']['median']:.2f}x")
        difference = row["max_abs_logit_diff_vs_per_sample_merges"]
        print(f"max |logit diff| vs per-sample merges [{model} {kind}]: {difference:.1e}")
        print(f"fused merge vs bandwidth floor [{model} {kind}]: {merge_vs_floor(row):.2f}x")
        print(f"state_dict merge vs fused merge [{model} {kind}]: {state_dict_vs_fused(row):.1f}x")


def merge_vs_floor(row: dict) -> float:
    return row["merge"]["fused_s"] / row["merge"]["floor_s"]


def state_dict_vs_fused(row: dict) -> float:
    return row["merge"]["state_dict_s"] / row["merge"]["fused_s"]


if __name__ == "__main__":
    main()
