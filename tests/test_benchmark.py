"""The benchmark script still runs and reports every row (a smoke test; no timing is asserted)."""

import json

from helpers import LOGITS_ATOL, load_benchmark


def test_benchmark_runs_and_reports_every_row(tmp_path, capsys):
    bench = load_benchmark()
    options = ["--batch-size", "3", "--classes", "2", "--min-time", "0", "--max-iters", "1", "--out", str(tmp_path)]
    bench.main([*options, "--no-isolate"])  # in this process: the subprocess per row is the same run_row
    (report_file,) = tmp_path.glob("bench_*.json")
    report = json.loads(report_file.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert set(rows) == set(bench.ROWS) and len(rows) == 8
    for name in ("t3_batch_interpolated", "t3_vectorized_interpolated", "t3_loop_interpolated"):
        assert rows[name]["max_abs_logit_diff_vs_exact_heads"] <= LOGITS_ATOL and rows[name]["argmax_as_exact_heads"]
    assert all(row["images_per_s"] > 0 and row["param_bytes"] > 0 for row in rows.values())
    # Peak memory is reported for every row; in one process it includes memory freed by earlier rows, so only
    # the isolated default (a process per row) gives figures worth comparing.
    assert all(isinstance(row["peak_bytes"], int) for row in rows.values())
    assert rows["t3_vectorized"]["max_abs_logit_diff_vs_loop"] <= LOGITS_ATOL  # logit scale ≤ 100
    printed = capsys.readouterr().out
    assert report["merge"]["parameters"] > 0 and "T3 best path vs T3_B, both with interpolated heads" in printed
