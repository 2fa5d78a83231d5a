"""Merging speed and memory of T³'s code paths, measured side by side in one run (a benchmark, not a test).

Prints and writes (JSON) three tables for one architecture with random weights:
- merge time: the fused store versus a reference-style merge (state_dict comprehension +
  ``load_state_dict``) versus the bandwidth floor (one ``torch.add`` over as many floats);
- throughput (images/s) and peak memory of: one model's zero-shot forward, T³_B, T³ sample-wise
  vectorized, T³ sample-wise loop over the fused store (these through the run's own ``TCubeEngine``), and a
  reference-style per-sample loop. Every T³ row includes what T³ needs: the pretrained and expert forwards that
  give JS and λ;
- the largest |logit difference| between vectorized and looped T³ (fp32).

Each row runs in its own subprocess (``--no-isolate``: all in this one, quicker, with coarser peak memory on
CPU). Peak memory is measured while the row runs, models included:
on CUDA ``max_memory_allocated``; on CPU the peak resident set (VmHWM, reset after set-up) less the
process's size after imports, which is coarser.

    python benchmarks/bench_merging.py --arch ViT-B-16 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcube_lightning.coefficients import LambdaMapping  # noqa: E402
from tcube_lightning.engine import TCubeEngine  # noqa: E402
from tcube_lightning.merging import FusedParameterStore  # noqa: E402
from tcube_lightning.models import clip_logits, zero_shot_head  # noqa: E402
from tcube_lightning.samplewise import per_sample_loop  # noqa: E402

ROWS = (
    "zeroshot_forward", "t3_batch", "t3_vectorized", "t3_loop_fused", "t3_batch_interpolated",
    "t3_vectorized_interpolated", "t3_loop_interpolated", "t3_loop_reference",
)  # fmt: skip
"""Rows ending in ``_interpolated`` take merged models' zero-shot heads from an interpolant in w fitted once
(untimed, as a run does in its set-up); the others run a text pass per merged weight (``--model.heads exact``)."""
MAPPING = LambdaMapping(gamma=50.0)
"""γ large enough that every sample gets its own weight, as with real disagreement."""


def build_pair(arch: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two models of ``arch``: random generalist, and an expert = generalist + small seeded noise."""
    import open_clip

    torch.manual_seed(0)
    pt = open_clip.create_model(arch).eval().requires_grad_(False)
    ft = open_clip.create_model(arch).eval().requires_grad_(False)
    with torch.no_grad():
        for p_ft, p_pt in zip(ft.parameters(), pt.parameters()):
            p_ft.copy_(p_pt + 0.02 * p_pt.abs().mean() * torch.randn_like(p_pt))
    return pt.to(device), ft.to(device)


def inputs(arch: str, pt: torch.nn.Module, batch: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    size = pt.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    tokens = open_clip.get_tokenizer(arch)([f"a photo of a class number {c}." for c in range(classes)]).to(device)
    return images, tokens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, min_time: float, max_iters: int) -> float:  # noqa: ANN001
    """Seconds per call: one warm-up call, then calls until ``min_time`` has passed (or ``max_iters``)."""
    fn()
    sync(device)
    iters, start = 0, time.perf_counter()
    while iters < max_iters and (iters == 0 or time.perf_counter() - start < min_time):
        fn()
        iters += 1
    sync(device)
    return (time.perf_counter() - start) / iters


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


def run_row(args: argparse.Namespace) -> dict:
    """One throughput row in this process: build what the row needs, time it, report peak memory. The T³ rows run
    the product's own engine; the reference row is the per-sample ``load_state_dict`` loop it replaced."""
    base_rss = current_rss()
    pt, ft = build_pair(args.arch, args.device)
    images, tokens = inputs(args.arch, pt, args.batch_size, args.classes, args.device)
    param_bytes = sum(p.numel() * p.element_size() for p in pt.parameters())
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    row = args.row
    engine = None
    if row in ("zeroshot_forward", "t3_loop_reference"):
        # --compile: the same functions through torch.compile (dynamic shapes: the loop varies the batch size).
        compiled = (lambda fn: torch.compile(fn, dynamic=True)) if args.compile else (lambda fn: fn)  # noqa: E731
        logits_of, head_fn = compiled(clip_logits), compiled(zero_shot_head)
        models = (pt,) if row == "zeroshot_forward" else (pt, ft)
        with torch.no_grad(), autocast:
            heads = [head_fn(m, tokens, args.classes) for m in models]
        if row == "zeroshot_forward":
            del ft
        else:
            working, sd_pt, sd_ft = copy.deepcopy(pt), pt.state_dict(), ft.state_dict()
    else:  # heads from an interpolant fitted in prepare (untimed, as a run does in its set-up) or exact
        path = "vectorized" if row.startswith("t3_vectorized") else "loop"
        head_mode = "interpolated" if row.endswith("_interpolated") else "exact"
        engine = TCubeEngine(pt, ft, [tokens], [args.classes], MAPPING, merge_text=not args.fixed_head,
                             samplewise=path, compile=args.compile, heads=head_mode)  # fmt: skip
        with torch.no_grad(), autocast:
            engine.prepare({}, extremes=False, weight_range=MAPPING.weight_range())

    def reference_merged_logits(batch: torch.Tensor, w: float) -> torch.Tensor:
        working.load_state_dict({k: w * sd_ft[k] + (1 - w) * sd_pt[k] for k in sd_pt})
        head = heads[0] if args.fixed_head else head_fn(working, tokens, args.classes)
        return logits_of(working, batch, head)

    def t3_logits() -> torch.Tensor:
        """This row's T³ logits for the batch, the pretrained and expert forwards that give λ included."""
        weights = engine.coefficients(images, 0).weights[""]
        if row.startswith("t3_batch"):
            return engine.merged_logits(images, float(weights.mean()))
        return engine.sample_merged_logits(images, weights)

    def step() -> torch.Tensor:
        with torch.no_grad(), autocast:
            if row == "zeroshot_forward":
                return logits_of(pt, images, heads[0])
            if row == "t3_loop_reference":
                pt_logits, ft_logits = (logits_of(m, images, h) for m, h in zip(models, heads))
                weights = MAPPING.expert_weights(MAPPING.lambdas(MAPPING.js(pt_logits, ft_logits)))
                return per_sample_loop(reference_merged_logits, images, weights)
            return t3_logits()

    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    seconds = timed(step, args.device, args.min_time, args.max_iters)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss() - base_rss
    result = {"row": row, "seconds_per_batch": seconds, "images_per_s": args.batch_size / seconds}
    result.update(peak_bytes=peak, param_bytes=param_bytes)
    if row == "t3_vectorized":  # against the loop path of the same engine
        with torch.no_grad(), autocast:
            vec = t3_logits()
            engine.path = "loop"
            loop = t3_logits()
        result["max_abs_logit_diff_vs_loop"] = float((vec.float() - loop.float()).abs().max())
        result["distinct_weights"] = int(torch.unique(engine.coefficients(images, 0).weights[""]).numel())
    if row.endswith("_interpolated"):  # against the same path with a text pass per merged weight
        with torch.no_grad(), autocast:
            ours = t3_logits()
            fitted, engine.interpolants = engine.interpolants, [None]  # no interpolant: direct heads
            exact = t3_logits()
            engine.interpolants = fitted
        result["max_abs_logit_diff_vs_exact_heads"] = float((ours.float() - exact.float()).abs().max())
        result["argmax_as_exact_heads"] = bool(torch.equal(ours.argmax(-1), exact.argmax(-1)))
    return result


def merge_times(args: argparse.Namespace) -> dict:
    """Fused merge vs reference-style merge vs one torch.add over as many floats."""
    pt, ft = build_pair(args.arch, args.device)
    working = copy.deepcopy(pt)
    sd_pt, sd_ft = pt.state_dict(), ft.state_dict()
    store = FusedParameterStore(pt, ft)
    n = store.num_parameters
    a, b, out = (torch.randn(n, device=args.device) for _ in range(3))
    flip = iter(range(10**9))

    def fused() -> None:
        store.merge(0.3 if next(flip) % 2 else 0.7)

    def reference() -> None:
        lam = 0.3
        working.load_state_dict({k: lam * sd_ft[k] + (1 - lam) * sd_pt[k] for k in sd_pt})

    def floor() -> None:
        torch.add(a, b, alpha=0.3, out=out)

    with torch.no_grad():
        times = {
            name: timed(fn, args.device, args.min_time, 10**6)
            for name, fn in (("fused", fused), ("reference", reference), ("floor", floor))
        }
    return {"parameters": n, **{f"{k}_s": v for k, v in times.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tcube-tiny-clip", help="open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=8, help="classes (one prompt each) of the zero-shot head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="run the forwards under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="run the forwards through torch.compile")
    parser.add_argument(
        "--fixed-head", action="store_true", help="merge_text off: merged models keep the pretrained head"
    )
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds each measurement runs at least")
    parser.add_argument("--max-iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON table")
    parser.add_argument(
        "--no-isolate", action="store_true", help="run every row in this process (quicker; coarser peak memory)"
    )
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: one row in a subprocess
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    with torch.no_grad():
        run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Every row (or, with the internal ``--row``, one), the merge timings, the printed and written report."""
    if args.row:
        print(json.dumps(run_row(args)))
        return
    rows = [run_row(argparse.Namespace(**{**vars(args), "row": row})) if args.no_isolate else isolated_row(argv, row)
            for row in ROWS]  # fmt: skip
    report = {"arch": args.arch, "batch_size": args.batch_size, "device": args.device, "bf16": args.bf16}
    report["compile"] = args.compile
    report.update(classes=args.classes, merge_text=not args.fixed_head)
    if args.device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name()
    report.update(merge=merge_times(args), rows=rows)
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (
        ("_bf16" if args.bf16 else "")
        + ("_compile" if args.compile else "")
        + ("_fixedhead" if args.fixed_head else "")
    )
    name = f"bench_{args.arch}_{args.device.replace(':', '')}_b{args.batch_size}{suffix}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out / name}")


def isolated_row(argv: list[str], row: str) -> dict:
    """One row in a fresh process, so that its peak memory is its own."""
    done = subprocess.run([sys.executable, __file__, *argv, "--row", row], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"row {row} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_report(report: dict) -> None:
    merge, rows = report["merge"], {r["row"]: r for r in report["rows"]}
    fused, reference, floor = merge["fused_s"], merge["reference_s"], merge["floor_s"]
    text = "merged text tower" if report["merge_text"] else "fixed text head"
    precision = ("bf16 autocast" if report["bf16"] else "fp32") + (", torch.compile" if report.get("compile") else "")
    device = report.get("device_name", report["device"])
    setting = f"batch {report['batch_size']}, {report['classes']} classes, {precision}, {text}"
    print(f"\n{report['arch']} on {device}, {setting}")
    print(f"\nmerge of {merge['parameters']:,} parameters")
    print("| merge | ms | ratio |\n|---|---:|---:|")
    print(f"| fused store | {1e3 * fused:.3f} | 1.00 |")
    print(f"| reference (dict + load_state_dict) | {1e3 * reference:.3f} | {reference / fused:.1f}x slower |")
    print(f"| bandwidth floor (one torch.add) | {1e3 * floor:.3f} | fused = {fused / floor:.2f}x floor |")
    param_mib = rows["zeroshot_forward"]["param_bytes"] / 2**20
    print(f"\nthroughput and peak memory (one model's parameters: {param_mib:.1f} MiB)")
    print("| path | images/s | vs T3_B | peak MiB | peak / params |\n|---|---:|---:|---:|---:|")
    batch_rate = rows["t3_batch"]["images_per_s"]
    for name, row in rows.items():
        print(
            f"| {name} | {row['images_per_s']:.1f} | {row['images_per_s'] / batch_rate:.2f} "
            f"| {row['peak_bytes'] / 2**20:.1f} | {row['peak_bytes'] / row['param_bytes']:.2f} |"
        )
    vec, loop, ref = rows["t3_vectorized"], rows["t3_loop_fused"], rows["t3_loop_reference"]
    best = max(vec["images_per_s"], loop["images_per_s"])
    print(f"\nT3 best path vs reference per-sample loop: {best / ref['images_per_s']:.2f}x")
    print(f"T3 best path vs T3_B: {best / batch_rate:.2f}x")
    interpolated = [rows[r] for r in ("t3_vectorized_interpolated", "t3_loop_interpolated")]
    best_interpolated = max(r["images_per_s"] for r in interpolated)
    print(f"T3 best path vs T3_B, both with interpolated heads: "
          f"{best_interpolated / rows['t3_batch_interpolated']['images_per_s']:.2f}x")  # fmt: skip
    print(f"T3 best path with interpolated heads vs T3_B with exact heads: {best_interpolated / batch_rate:.2f}x")
    for name, row in rows.items():
        if "max_abs_logit_diff_vs_exact_heads" in row:
            print(f"{name}: max |logit diff| vs exact heads {row['max_abs_logit_diff_vs_exact_heads']:.2e}, "
                  f"argmax identical: {row['argmax_as_exact_heads']}")
    diff, distinct = vec["max_abs_logit_diff_vs_loop"], vec["distinct_weights"]
    print(f"max |logit diff| vectorized vs loop: {diff:.2e} ({distinct} distinct weights)")


if __name__ == "__main__":
    main()
