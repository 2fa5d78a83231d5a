"""``predict`` on unlabelled images through the real command line: each source's table (CSV and Parquet) against
what ``test --model.export_samples true`` exports for the same images, image folders nested or flat, bad input."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import (
    ARCH,
    CLASSNAMES,
    GAMMA,
    TEMPLATES,
    cli_args,
    interrupt_in_split,
    run_cli_expecting_error,
    write_dicom,
)
from tcube_lightning.cli.app import main
from tcube_lightning.reporting.samples import read_table

METHODS = "--model.methods=[t3, t3_batch, dawin_cluster]"


def predict_args(clip_pair, root, out, sources, *extra):
    return [
        "predict",
        f"--model.arch={ARCH}",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        f"--data.root={root}",
        f"--data.sources={json.dumps(sources)}",
        f"--data.classnames={json.dumps(CLASSNAMES)}",
        f"--data.templates={json.dumps(TEMPLATES)}",
        "--data.image_size=28",
        "--data.batch_size=8",
        f"--model.gamma={GAMMA}",
        f"--model.results_dir={out}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predictions_are_what_test_exports_for_the_same_images(clip_pair, npz_root, tmp_path, caplog):
    exported = tmp_path / "test"
    main(
        cli_args(
            clip_pair,
            npz_root,
            tmp_path / "runs",
            METHODS,
            "--data.batch_size=8",
            f"--model.gamma={GAMMA}",
            "--model.export_samples=true",
            f"--model.results_dir={exported}",
        )
    )
    out = tmp_path / "predict"
    main(predict_args(clip_pair, npz_root, out, {"a": "tiny_a.npz"}, METHODS))
    table, export = pq.read_table(out / "predictions" / "a.parquet").to_pydict(), read_table(exported / "samples/a.npz")
    assert table["image"] == [str(i) for i in range(37)]  # rows of the npz, in order
    for method in ("t3", "t3_batch", "dawin_cluster", "zeroshot", "expert"):
        assert table[f"pred/{method}"] == [CLASSNAMES[c] for c in export[f"pred/{method}"]], method
        np.testing.assert_array_equal(table[f"prob/{method}"], export[f"prob/{method}"], err_msg=method)
    for column in ("js", "lambda", "w/t3", "w/dawin_cluster"):
        np.testing.assert_array_equal(table[column], export[column], err_msg=column)
    rows = read_csv(out / "predictions" / "a.csv")  # the same, for people
    assert [r["pred/t3"] for r in rows] == table["pred/t3"]
    np.testing.assert_allclose([float(r["prob/t3"]) for r in rows], table["prob/t3"], rtol=1e-6)
    summary = json.loads((out / "predictions" / "predictions.json").read_text())
    assert summary["complete"]
    assert summary["sources"] == {"a": {"rows": 37, "total": 37, "skipped": {}, "complete": True}}
    assert summary["methods"] == ["t3", "t3_batch", "dawin_cluster"]
    said = [record.getMessage() for record in caplog.records]
    assert "predict runs ['t3', 't3_batch', 'dawin_cluster'] (as model.methods names them)" in said


def test_an_image_folder_nested_or_flat_keeps_every_files_path(clip_pair, tmp_path):
    folder = tmp_path / "scans"
    paths = ["2024/patient 1/a.png", "2024/patient 1/b.jpg", "2025/c.png", "d.PNG"]
    for i, path in enumerate(paths):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((28, 28, 3), 50 * i, np.uint8)).save(folder / path, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"partial predictions: .*'scans': '2 of 4'"):
        main(
            predict_args(
                clip_pair, tmp_path, out, {"scans": "scans"}, "--data.batch_size=2", "--trainer.limit_predict_batches=1"
            )
        )
    assert json.loads((out / "predictions" / "predictions.json").read_text())["complete"] is False
    main(predict_args(clip_pair, tmp_path, tmp_path / "whole", {"scans": "scans"}))
    rows = read_csv(tmp_path / "whole" / "predictions" / "scans.csv")
    assert [r["image"] for r in rows] == sorted(paths) and all(r["pred/t3"] in CLASSNAMES for r in rows)
    assert list(rows[0])[:3] == ["image", "pred/t3", "prob/t3"]  # then the two models' own, JS, λ, weights


def test_bad_predict_input_is_refused_before_any_model_loads(clip_pair, npz_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tcube_lightning.loading.sources.load_source", lambda *a: pytest.fail("a model was loaded"))
    args = predict_args(clip_pair, npz_root, tmp_path / "out", {"a": "tiny_a.npz"})
    for change, message in (
        ("--data.sources={}", "data: give a modality, or sources"),
        ('--data.sources={"m": "missing"}', "data file not found: " + str(npz_root / "missing")),
        ("--data.classnames=null", "data.classnames: predict names its classes by data.classnames"),
        ("--model.resume=true", "model.resume continues an interrupted test run"),
    ):
        assert message in run_cli_expecting_error([*args, change], capsys), change
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    assert "already holds predictions/ from an earlier run" in run_cli_expecting_error(args, capsys)


def test_an_interrupted_prediction_run_exits_non_zero_and_says_it_is_incomplete(
    clip_pair, npz_root, tmp_path, capsys, monkeypatch
):
    interrupt_in_split(monkeypatch, "b", "predict_step")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(predict_args(clip_pair, npz_root, out, {"a": "tiny_a.npz", "b": "tiny_b.npz"}))
    assert stop.value.code == 130
    assert "stopped by SIGINT before the last source" in capsys.readouterr().err
    assert (out / "predictions" / "a.csv").is_file()  # a finished source's table is whole
    assert not (out / "predictions" / "b.csv").exists() and not (out / "predictions" / "predictions.json").exists()


def test_unreadable_images_are_skipped_with_why_and_the_others_predicted(clip_pair, tmp_path):
    folder = tmp_path / "export"  # a PACS export: DICOM files without a suffix, one of them broken, one a cine loop
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        write_dicom(folder / f"IM{i:04d}", rng.integers(0, 4096, size=(28, 28)).astype(np.uint16))
    (folder / "IM0002").write_bytes(b"cut short by the export")
    write_dicom(folder / "IM0009", np.zeros((28, 28), np.uint16), frames=2)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "photo.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    out = tmp_path / "out"
    main(predict_args(clip_pair, tmp_path, out, {"scans": "export"}, "--data.dicom=all", "--data.batch_size=2"))
    summary = json.loads((out / "predictions" / "predictions.json").read_text())
    source = summary["sources"]["scans"]
    assert (source["rows"], source["total"], source["complete"]) == (5, 8, True)
    assert set(source["skipped"]) == {"IM0002", "IM0009", "broken.png"}
    assert "not a readable DICOM file" in source["skipped"]["IM0002"]
    assert "a multi-frame DICOM (2 frames" in source["skipped"]["IM0009"]
    assert "cannot be read as an image" in source["skipped"]["broken.png"]
    assert summary["dicom"]["scans"]["files"] == 6 and set(summary["dicom"]["scans"]["unreadable"]) == {
        str(folder / "IM0002"),
        str(folder / "IM0009"),
    }
    rows = read_csv(out / "predictions" / "scans.csv")
    assert [r["image"] for r in rows] == sorted(p.name for p in folder.iterdir())
    for row in rows:
        assert bool(row["skipped"]) == (row["image"] in source["skipped"]) == (row["pred/t3"] == "")
    table = pq.read_table(out / "predictions" / "scans.parquet").to_pydict()
    assert [p is None for p in table["prob/t3"]] == [r["skipped"] != "" for r in rows]


def test_a_batch_or_a_source_with_no_readable_image_is_skipped_by_every_method(clip_pair, tmp_path):
    """The clustered methods' second pass over a batch of unreadable files, and a source none of whose files can be
    read: every row skipped with why, the others predicted, exit 0 with a warning naming the source."""
    good, junk = tmp_path / "scans", tmp_path / "junk"
    for folder in (good, junk):
        folder.mkdir()
    for name in ("a0.png", "a1.png"):  # the first batch of two: nothing readable
        (good / name).write_bytes(b"not an image")
    for i in range(3):
        Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)).save(good / f"b{i}.png")
        (junk / f"{i}.png").write_bytes(b"\x89PNG cut short")
    out = tmp_path / "out"
    sources = {"scans": "scans", "junk": "junk"}
    methods = "--model.methods=[t3, t3_cluster, dawin_cluster]"
    with pytest.warns(UserWarning, match=r"no image of source 'junk' could be read \(the first, 0.png: "):
        main(predict_args(clip_pair, tmp_path, out, sources, methods, "--data.batch_size=2"))
    summary = json.loads((out / "predictions" / "predictions.json").read_text())
    assert {s: (n["rows"], len(n["skipped"])) for s, n in summary["sources"].items()} == {
        "scans": (3, 2),
        "junk": (0, 3),
    }
    rows = read_csv(out / "predictions" / "scans.csv")
    assert [r["pred/t3_cluster"] != "" for r in rows] == [False, False, True, True, True]
    junk_rows = read_csv(out / "predictions" / "junk.csv")
    assert [r["image"] for r in junk_rows] == ["0.png", "1.png", "2.png"]
    assert all(r["skipped"] and r["pred/t3"] == "" for r in junk_rows)
