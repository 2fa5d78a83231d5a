"""T³ against T³_B and against a per-sample reference, side by side in one run (a benchmark, not a test).

For each model, expert kind (a full fine-tuned copy, or a rank-16 LoRA on every qkv of the image tower) and number of
experts K (``model:kind:K``, K = 1 without the suffix; with several, T³-K, our extension of T³, with the run's default
heads: the generalist's, ``merge_text`` false):
- T³ / T³_B: throughput of T³ (each sample its own merge, through the run's engine, on the path ``samplewise:
  auto`` takes) over that of T³_B (one merge per batch at the mean λ), measured interleaved (T³_B, T³, T³_B, T³,
  …) so that the machine's load falls on both alike; the median ratio of the repeats, with their spread. Both take
  two seeded batches in turn, as a stream, so that T³_B merges at every call as in a run (until 2026-12-07 one batch
  was repeated, and the store kept T³_B's merge from one call to the next: T³_B's figures left its merge out);
- T³ / reference: over a per-sample reference loop (a state_dict merge θ_pt + Σ_k w_k·τ_k of what the run merges,
  ``load_state_dict`` and, with one expert, a text pass per sample, as DaWin's code does; with several, the image
  tower and logit scale alone, as DaWin-MTL merges its image encoder), which also gives the largest |logit|
  difference of T³ from per-sample merges; and its bound, reference / λ forwards: what T³ would reach over the
  reference if its per-sample pass cost nothing (both run the K + 1 forwards that give λ);
- T³ pass / reference loop: the per-sample stages alone, at the same weights (T³'s pass over the reference's loop of
  state_dict merges and forwards), interleaved, the median of three;
- peak memory over one model's parameters of T³_B and T³, each measured in a process of its own, and the engine's
  parameter store (the generalist, the experts as kept: a full copy each, a LoRA expert's factors; the
  working model's merged tensors) over one model's parameters;
- the merge T³_B and every static method pay: the store's fused merge against its bandwidth floor (one ``torch.add``
  over as many floats) and a state_dict merge with ``load_state_dict`` against the fused one.
Every T³ and T³_B figure includes the pretrained and expert forwards that give λ; zero-shot heads come from
interpolants fitted once (untimed, as a run does in its set-up). Models have random weights: ``clip-tiny``
(the bundled tcube-tiny-clip), ``clip-b16`` (open_clip's ViT-B-16), ``biomedclip-tiny`` (timm's test_vit and a
2-layer BERT) and ``biomedclip-base`` (ViT-B/16 and BERT-base: BiomedCLIP's sizes). Besides its table it prints,
per row, ``T3 vs T3_B [<model> <expert kind> K=<k>]: <ratio>x``, ``T3 vs reference [<model> <expert kind> K=<k>]:
<ratio>x``, ``reference vs lambda forwards [<model> <expert kind> K=<k>]: <ratio>x``, ``T3 pass vs reference loop
[<model> <expert kind> K=<k>]: <ratio>x``, ``max |logit diff| vs per-sample merges [<model> <expert kind> K=<k>]:
<value>``, ``fused merge vs bandwidth floor [<model> <expert kind> K=<k>]: <ratio>x`` and ``state_dict merge vs fused
merge [<model> <expert kind> K=<k>]: <ratio>x``, for scripts to compare runs; a one-expert row also under the label
earlier runs printed, ``[<model> <expert kind>]``.

    python benchmarks/bench_merging.py --rows biomedclip-base:full biomedclip-base:lora:4 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
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
from tcube_lightning.merging.coefficients import LambdaMapping, batch_coefficient
from tcube_lightning.quiet import creating_empty_models

MODELS = ("clip-tiny", "biomedclip-tiny", "clip-b16", "biomedclip-base")
KINDS = ("full", "lora")
DEFAULT_ROWS = (
    "clip-tiny:full",
    "biomedclip-tiny:full",
    "biomedclip-tiny:lora",
    "clip-tiny:full:2",
    "clip-tiny:full:2:text",
    "clip-tiny:full:4",
    "clip-tiny:lora:4",
    "biomedclip-tiny:full:2",
    "biomedclip-tiny:full:4",
    "biomedclip-tiny:lora:4",
)
BATCH = {"clip-tiny": 32, "biomedclip-tiny": 32, "clip-b16": 8, "biomedclip-base": 8}
CLIP = {"clip-tiny": "tcube-tiny-clip", "clip-b16": "ViT-B-16"}
STAGE_REPEATS = 3
"""Interleaved measurements of the per-sample stages alone (the reference's loop is slow: once per repeat)."""
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
def build(model: str, kind: str, count: int, classes: int, device: str) -> tuple[torch.nn.Module, list, torch.Tensor]:
    """Generalist, ``count`` experts (full models or LoraAdapters, each seeded differently; the first the same for
    every K) and class prompt tokens, seeded."""
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
        return pretrained.to(device), [lora_expert(pretrained, 1 + k) for k in range(count)], tokens.to(device)
    experts = []
    for _ in range(count):
        expert = copy.deepcopy(pretrained)
        with torch.no_grad():
            for p_ft in expert.parameters():
                p_ft.add_(0.02 * p_ft.abs().mean() * torch.randn_like(p_ft))
        experts.append(expert.to(device))
    return pretrained.to(device), experts, tokens.to(device)


def lora_expert(pretrained: torch.nn.Module, seed: int) -> LoraAdapter:
    """A rank-16 LoRA on every qkv projection of the image tower (timm's ``qkv``, open_clip's attention in_proj)."""
    g = torch.Generator().manual_seed(seed)
    visual = pretrained.visual
    if hasattr(visual, "trunk"):
        targets = {
            f"visual.trunk.blocks.{i}.attn.qkv.weight": b.attn.qkv.weight for i, b in enumerate(visual.trunk.blocks)
        }
    else:
        targets = {
            f"visual.transformer.resblocks.{i}.attn.in_proj_weight": b.attn.in_proj_weight
            for i, b in enumerate(visual.transformer.resblocks)
        }
    updates = [
        LowRankUpdate(
            name,
            0.02 * torch.randn(LORA_RANK, weight.shape[1], generator=g),
            0.02 * torch.randn(weight.shape[0], LORA_RANK, generator=g),
            1.0,
        )
        for name, weight in targets.items()
    ]
    return LoraAdapter("LoRA (benchmark)", "random", updates)


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


def state_dict_merge(pt: dict, experts: list[dict], weights: list[float]) -> dict:
    """θ_pt + Σ_k w_k·(θ_k − θ_pt) tensor by tensor (one expert's by ``torch.lerp``), as DaWin's code merges."""
    if len(experts) == 1:
        return {k: torch.lerp(pt[k], experts[0][k], weights[0]) if pt[k].is_floating_point() else pt[k] for k in pt}
    return {
        k: pt[k] + sum(w * (ft[k] - pt[k]) for w, ft in zip(weights, experts)) if pt[k].is_floating_point() else pt[k]
        for k in pt
    }


def parse_row(row: str) -> tuple[str, str, int, bool]:
    """``model:kind``, ``model:kind:K`` or ``model:kind:K:text`` (merged text towers with several experts) → (model,
    kind, K, merged text towers)."""
    model, kind, *rest = row.split(":")
    count, text = [*rest, None, None][:2]
    valid = model in MODELS and kind in KINDS and len(rest) <= 2 and text in (None, "text")
    if not valid or (count is not None and not count.isdigit()):
        raise argparse.ArgumentTypeError(f"{row!r}: expected model:kind[:K[:text]], model in {MODELS}, kind in {KINDS}")
    count = int(count) if count else 1
    return model, kind, count, count == 1 or text == "text"


def row_label(row: str) -> str:
    """How the printed lines name a row: ``<model> <kind> K=<k>`` and, with several experts' text towers merged,
    `` merged text``."""
    model, kind, count, text = parse_row(row)
    return f"{model} {kind} K={count}" + (" merged text" if count > 1 and text else "")


class Row:
    """One model, expert kind and number of experts: the engine as a run builds it, and the three computations
    compared."""

    def __init__(self, args: argparse.Namespace, row: str, reference: bool = True) -> None:
        self.model, self.kind, self.count, self.merge_text = parse_row(row)
        self.row = row
        self.args, self.device = args, args.device
        self.batch = args.batch_size or BATCH[self.model]
        pretrained, experts, tokens = build(self.model, self.kind, self.count, args.classes, self.device)
        self.param_bytes = sum(p.numel() * p.element_size() for p in pretrained.parameters())
        self.adapter_bytes = sum(
            t.numel() * t.element_size()
            for e in experts
            if isinstance(e, LoraAdapter)
            for u in e.updates
            for t in (u.down, u.up)
        )
        if reference:  # more copies of the parameters: left out where peak memory is measured
            full = [e.expert(pretrained) if isinstance(e, LoraAdapter) else e for e in experts]
            self.reference_states = (
                copy.deepcopy(pretrained.state_dict()),
                [copy.deepcopy(e.state_dict()) for e in full],
            )
            self.reference_keys = [  # what the run merges: the text tower too only where its heads are merged
                key
                for key in self.reference_states[0]
                if self.merge_text or key.startswith("visual.") or key == "logit_scale"
            ]
            self.reference_model = copy.deepcopy(pretrained)
            del full
        self.engine = TCubeEngine(
            pretrained,
            experts,
            [tokens],
            [args.classes],
            MAPPING,
            merge_text=self.merge_text,
            samplewise="auto",
            compile=args.compile,
            heads="interpolated",
        )
        self.tokens = tokens
        size = image_side(pretrained.visual.image_size)
        self.images, other = (
            torch.randn(self.batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(self.device)
            for seed in (1, 2)
        )
        self.stream = itertools.cycle((self.images, other))
        """T³_B and T³ take two batches in turn, as a run's stream: each batch's mean λ differs from the last, so T³_B
        merges at every call as it does in a run (on one batch repeated the store would keep the merge it made)."""
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
        with torch.no_grad(), self.autocast:
            box = self.engine.k_experts.box(*MAPPING.weight_range(), self.count)  # each expert's weights, as a run's
            self.engine.prepare({}, extremes=False, weight_range=box)
            self.pt_head = zero_shot_head(self.engine.store.pretrained, tokens, args.classes)

    def t3_batch(self, images: torch.Tensor | None = None) -> torch.Tensor:
        images = next(self.stream) if images is None else images
        with torch.no_grad(), self.autocast:
            weights = self.engine.coefficients(images, 0).weights[""]
            return self.engine.merged_logits(images, batch_coefficient(weights))

    def t3(self, images: torch.Tensor | None = None) -> torch.Tensor:
        images = next(self.stream) if images is None else images
        return self.t3_pass(self.lambda_forwards(images), images)

    def t3_pass(self, weights: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """T³'s per-sample stage alone: each sample through its own merge, at given weights."""
        with torch.no_grad(), self.autocast:
            return self.engine.sample_merged_logits(self.images if images is None else images, weights)

    def lambda_forwards(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """What T³, T³_B and the reference all run first: the K + 1 forwards that give each sample's weights."""
        with torch.no_grad(), self.autocast:
            return self.engine.coefficients(self.images if images is None else images, 0).weights[""]

    def reference(self) -> torch.Tensor:
        """Per sample: the state_dict merge of what the run merges, load_state_dict, with one expert a text pass for
        the head (with several, the generalist's head, as the run), the image forward."""
        return self.reference_loop(self.lambda_forwards())

    def reference_loop(self, weights: torch.Tensor) -> torch.Tensor:
        """The reference's per-sample stage alone, at given weights."""
        pt = {key: self.reference_states[0][key] for key in self.reference_keys}
        experts = [{key: e[key] for key in self.reference_keys} for e in self.reference_states[1]]
        with torch.no_grad(), self.autocast:
            logits = []
            for image, w in zip(self.images, weights.tolist()):
                self.reference_model.load_state_dict(state_dict_merge(pt, experts, w), strict=self.merge_text)
                if self.merge_text:
                    head = zero_shot_head(self.reference_model, self.tokens, self.args.classes)
                else:
                    head = self.pt_head
                logits.append(clip_logits(self.reference_model, image[None], head)[0])
            return torch.stack(logits)

    def measure(self) -> dict:
        """Interleaved timings, the reference, the logit difference (peak memory comes from ``peak``)."""
        for _ in range(2):  # warm-up and compilation: twice, as a compiled pass recompiles once its buffers exist
            self.t3_batch(), self.t3()
        calls = max(1, math.ceil(self.args.min_time / max(seconds_per_call(self.t3_batch, self.device, 1), 1e-9)))
        ratios, batch_seconds, t3_seconds = [], [], []
        for _ in range(self.args.repeats):
            batch_seconds.append(seconds_per_call(self.t3_batch, self.device, calls))
            t3_seconds.append(seconds_per_call(self.t3, self.device, calls))
            ratios.append(batch_seconds[-1] / t3_seconds[-1])  # throughput of T³ over that of T³_B
        reference_seconds = seconds_per_call(self.reference, self.device, 1)
        lambda_seconds = seconds_per_call(self.lambda_forwards, self.device, calls)
        weights = self.lambda_forwards()  # the per-sample stages alone, at the same weights, interleaved
        stages = [
            seconds_per_call(lambda: self.reference_loop(weights), self.device, 1)
            / seconds_per_call(lambda: self.t3_pass(weights), self.device, calls)
            for _ in range(STAGE_REPEATS)
        ]
        merge = self.merge_times()
        difference = float((self.t3(self.images).float() - self.reference().float()).abs().max())
        return {
            "row": self.row,
            "experts": self.count,
            "heads": "merged text tower, interpolated" if self.merge_text else "the generalist's (merge_text false)",
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
            "reference_vs_lambda_forwards": reference_seconds / lambda_seconds,
            "t3_pass_vs_reference_loop": statistics.median(stages),
            "max_abs_logit_diff_vs_per_sample_merges": difference,
            "param_bytes": self.param_bytes,
            "adapter_bytes": self.adapter_bytes,
            "store_bytes": sum(b.numel() * b.element_size() for b in self.engine.store.buffers()),
            "merge": merge,
        }

    def merge_times(self) -> dict:
        """What T³_B and every static method pay per merge: the store's fused merge (alternating weights, so that each
        call computes), its bandwidth floor (one ``torch.add`` over as many floats: 2 reads and a write), the K-aware
        floor (a merge of K task vectors reads K + 1 vectors and writes one: one ``torch.add`` over (K + 2)/3 times as
        many floats, the same bytes through a working set of the same size, so that caches favour neither,
        ``floor_k_s``; with one expert the floor itself) and a state_dict merge with ``load_state_dict``,
        interleaved; medians of the repeats, in seconds."""
        store = self.engine.store
        floats = sum(store.shapes[name].numel() for name in store.merged_names)  # all, or the LoRA targets
        k_floats = math.ceil(floats * (self.count + 2) / 3)
        a, b, out = (
            torch.randn(k_floats, generator=torch.Generator().manual_seed(seed)).to(self.device) for seed in range(3)
        )
        weights = itertools.cycle(([0.3 / self.count] * self.count, [0.7 / self.count] * self.count))  # T³'s: convex
        pt, experts = self.reference_states
        paths = {
            "fused": lambda: store.merge(next(weights)),  # with LoRA targets computed in the forwards: nothing to time
            "floor": lambda: torch.add(a[:floats], b[:floats], alpha=0.3, out=out[:floats]),
            "floor_k": lambda: torch.add(a, b, alpha=0.3, out=out),
            "state_dict": lambda: self.reference_model.load_state_dict(
                state_dict_merge(pt, experts, [0.3] * self.count)
            ),
        }
        if store.computed:
            del paths["fused"]
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        with torch.no_grad():
            once = {name: max(seconds_per_call(function, self.device, 1), 1e-9) for name, function in paths.items()}
            calls = {name: max(1, math.ceil(self.args.min_time / 10 / once[name])) for name in paths}
            for _ in range(self.args.repeats):
                for name, function in paths.items():
                    seconds[name].append(seconds_per_call(function, self.device, calls[name]))
        medians = {f"{name}_s": statistics.median(values) for name, values in seconds.items()}
        return {"floats": floats, "computed_in_forwards": store.computed, **medians}


def peak(args: argparse.Namespace, row: str, path: str) -> int:
    """Peak memory while ``path`` runs, models included: CUDA's max_memory_allocated, or on CPU the peak resident
    set less the process's size before the models are built (coarser), after a garbage collection and glibc's
    ``malloc_trim`` so that memory freed on the way (and kept by the allocator) does not count for or against the
    row."""
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
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
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="model:expert kind[:number of experts]")
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
    for row in args.rows:
        try:
            parse_row(row)
        except argparse.ArgumentTypeError as err:
            parser.error(f"--rows: {err}")
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
    print(f"\n{report['device']}, {report['classes']} classes, {precision}")
    print(
        "| model | expert | K | heads | batch | T3 path | T3 / T3_B (median [min, max]) | T3 / reference "
        "| reference / λ forwards | T3 pass / reference loop | max logit diff | peak / params T3_B, T3 "
        "| store / params | adapters / params "
        "| fused merge / floor | state_dict merge / fused |\n"
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for row in report["rows"]:
        model, kind, count, _ = parse_row(row["row"])
        ratio, path = row["t3_vs_t3_batch"], row["path"]
        label = f"{path['path']} ({path.get('pass', path.get('reason'))})"
        print(
            f"| {model} | {kind} | {count} | {row['heads']} | {row['batch_size']} | {label} "
            f"| {ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] of {ratio['repeats']} "
            f"| {row['t3_vs_reference']:.2f} | {row['reference_vs_lambda_forwards']:.2f} "
            f"| {row['t3_pass_vs_reference_loop']:.2f} "
            f"| {row['max_abs_logit_diff_vs_per_sample_merges']:.1e} "
            f"| {row['t3_batch_peak_over_params']:.2f}, {row['t3_peak_over_params']:.2f} "
            f"| {row['store_bytes'] / row['param_bytes']:.2f} | {row['adapter_bytes'] / row['param_bytes']:.3f} "
            f"| {merge_vs_floor(row)} ({merge_vs_floor(row, 'floor_k_s')} of the K-aware floor) "
            f"| {state_dict_vs_fused(row)} |"
        )
    print()
    for row in report["rows"]:
        model, kind, count, _ = parse_row(row["row"])
        labels = [row_label(row["row"])] + ([f"{model} {kind}"] if count == 1 else [])  # and as earlier runs
        for label in labels:
            print(f"T3 vs T3_B [{label}]: {row['t3_vs_t3_batch']['median']:.2f}x")
            print(f"T3 vs reference [{label}]: {row['t3_vs_reference']:.2f}x")
            print(f"reference vs lambda forwards [{label}]: {row['reference_vs_lambda_forwards']:.2f}x")
            print(f"T3 pass vs reference loop [{label}]: {row['t3_pass_vs_reference_loop']:.2f}x")
            difference = row["max_abs_logit_diff_vs_per_sample_merges"]
            print(f"max |logit diff| vs per-sample merges [{label}]: {difference:.1e}")
            print(f"fused merge vs bandwidth floor [{label}]: {merge_vs_floor(row)}")
            print(f"fused merge vs K-aware floor [{label}]: {merge_vs_floor(row, 'floor_k_s')}")
            print(f"state_dict merge vs fused merge [{label}]: {state_dict_vs_fused(row)}")


IN_FORWARDS = "n/a (LoRA targets computed in the forwards)"


def merge_vs_floor(row: dict, floor: str = "floor_s") -> str:
    merge = row["merge"]
    return IN_FORWARDS if merge["computed_in_forwards"] else f"{merge['fused_s'] / merge[floor]:.2f}x"


def state_dict_vs_fused(row: dict) -> str:
    merge = row["merge"]
    return IN_FORWARDS if merge["computed_in_forwards"] else f"{merge['state_dict_s'] / merge['fused_s']:.1f}x"


if __name__ == "__main__":
    main()
