"""The benchmark script still runs and reports every row (a smoke test; no timing is asserted)."""

import json
import os
import subprocess
import sys

from test_cli import REPO


def test_benchmark_runs_and_reports_every_row(tmp_path):
    command = [sys.executable, "benchmarks/bench_merging.py", "--batch-size", "3", "--classes", "2"]
    command += ["--min-time", "0", "--max-iters", "1", "--out", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("bench_*.json")
    report = json.loads(report_file.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert set(rows) == {"zeroshot_forward", "t3_batch", "t3_vectorized", "t3_loop_fused", "t3_loop_reference"}
    assert all(row["images_per_s"] > 0 and row["peak_bytes"] > 0 for row in rows.values())
    assert rows["t3_vectorized"]["max_abs_logit_diff_vs_loop"] <= 1e-4
    assert report["merge"]["parameters"] > 0 and "T3 best path vs T3_B" in done.stdout
