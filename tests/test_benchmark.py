"""The benchmark script still runs and reports every row in the forms README and scripts read (a smoke test: no
timing is asserted; the logit differences are, against the tolerances of what each path computes)."""

import json
import re
import tempfile

import pytest
import torch

from helpers import LOGITS_ATOL, load_benchmark

HEAD_TOLERANCE = 1e-4
"""The interpolated heads' own bound on a logit's change (the engine's default ``head_tolerance``)."""


def test_benchmark_runs_and_reports_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system_temp"))  # where its temporary folders would stay
    (tmp_path / "system_temp").mkdir()
    bench = load_benchmark()
    rows = [
        "clip-tiny:full",
        "biomedclip-tiny:lora",
        "clip-tiny:lora:2",
        "biomedclip-tiny:full:2",
    ]
    options = ["--rows", *rows, "--batch-size", "3", "--classes", "2", "--repeats", "2", "--min-time", "0"]
    bench.main([*options, "--out", str(tmp_path), "--no-isolate"])  # peak memory in this process: coarser, quicker
    (report_file,) = tmp_path.glob("bench_*.json")
    report = json.loads(report_file.read_text())
    assert [row["row"] for row in report["rows"]] == rows
    printed = capsys.readouterr().out
    labels = (
        "clip-tiny full K=1",
        "biomedclip-tiny lora K=1",
        "clip-tiny lora K=2",
        "biomedclip-tiny full K=2",
    )
    for row, label in zip(report["rows"], labels, strict=True):
        ratio = row["t3_vs_t3_batch"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["repeats"] == 2
        assert row["path"]["path"] == "vectorized" and row["t3_vs_reference"] > 0
        assert row["max_abs_logit_diff_vs_per_sample_merges"] <= LOGITS_ATOL + HEAD_TOLERANCE
        assert row["t3_peak_over_params"] >= 0 and row["t3_batch_peak_over_params"] >= 0  # coarse in one process
        assert re.search(rf"^T3 vs T3_B \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^T3 vs reference \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^reference vs lambda forwards \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^T3 pass vs reference loop \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^max \|logit diff\| vs per-sample merges \[{label}\]: \S+$", printed, flags=re.M)
        merge = row["merge"]
        assert merge["floor_s"] > 0 and merge["state_dict_s"] > 0
        if merge["computed_in_forwards"]:  # LoRA experts alone: no merge to time, their targets come in the forwards
            assert "fused_s" not in merge and label.split()[1] == "lora"
            assert re.search(rf"^fused merge vs bandwidth floor \[{label}\]: n/a \(.*\)$", printed, flags=re.M)
            continue
        assert merge["fused_s"] > 0
        assert re.search(rf"^fused merge vs bandwidth floor \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^fused merge vs K-aware floor \[{label}\]: \d+\.\d\dx$", printed, flags=re.M)
        assert re.search(rf"^state_dict merge vs fused merge \[{label}\]: \d+\.\dx$", printed, flags=re.M)
    assert re.search(r"^T3 vs T3_B \[clip-tiny full\]: \d+\.\d\dx$", printed, flags=re.M)  # as earlier runs print
    assert report["rows"][1]["path"]["pass"] == report["rows"][2]["path"]["pass"] == "leaf-wise, low-rank (LoRA)"
    assert report["rows"][2]["experts"] == 2 and report["rows"][2]["adapter_bytes"] > 0
    assert (
        report["rows"][3]["path"]["pass"] == "leaf-wise, weights merged per row in leaves of at least 32 tokens per row"
    )
    assert report["rows"][3]["heads"] == "the generalist's (merge_text false)"
    assert bench.parse_row("clip-tiny:full:2:text") == ("clip-tiny", "full", 2, True)  # a row that merges text
    assert bench.row_label("clip-tiny:full:2:text") == "clip-tiny full K=2 merged text"
    assert report["rows"][1]["merge"]["floats"] < report["rows"][0]["merge"]["floats"]  # a LoRA merge: its targets
    assert report["rows"][1]["merge"]["computed_in_forwards"] and not report["rows"][3]["merge"]["computed_in_forwards"]
    assert not list((tmp_path / "system_temp").iterdir())  # the BiomedCLIP-shaped rows' config folders are gone


def test_the_merge_passes_benchmark_times_every_way_against_the_floor(capsys):
    bench = load_benchmark("bench_merge_passes")
    bench.main(["--floats", "1000", "--experts", "1", "3", "--chunk", "300", "--repeats", "1", "--min-time", "0"])
    printed = capsys.readouterr().out
    for count in (1, 3):
        assert re.search(rf"^K-aware floor \[1000 K={count}\]: \d+\.\d{{3}} ms$", printed, flags=re.M)
        for way in ("chain of lerps \\(the store's\\)", "matrix-vector product", "chain over chunks of 300"):
            assert re.search(rf"^{way} / K-aware floor \[1000 K={count}\]: \d+\.\d\dx$", printed, flags=re.M)


def test_the_merge_passes_benchmark_times_no_way_that_computes_another_merge(monkeypatch):
    bench = load_benchmark("bench_merge_passes")
    monkeypatch.setattr(bench, "add_task_vectors", lambda pt, rows, weights, out: torch.add(pt, rows[0], out=out))
    with pytest.raises(AssertionError, match="chain of lerps"):
        bench.ways(1000, 2, 300, inductor=False)
