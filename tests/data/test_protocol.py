"""The evaluation protocol: every modality and data format, on files the tests write in the real layouts."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    REPO,
    run_cli_in_process,
    write_medimeta,
    write_medmnist_npz,
    write_medmnistc_stacked,
    write_modality_data,
)
from tcube_lightning.data.datamodule import EvaluationDataModule
from tcube_lightning.data.images import ImageFolder
from tcube_lightning.data.modalities import MODALITIES, modality_corruptions
from tcube_lightning.data.readers import (
    CorruptedOnTheFly,
    HFImages,
    MedIMetaImages,
    read_medmnist_npz,
    read_medmnistc_file,
)
from tcube_lightning.errors import InputError
from tcube_lightning.reporting import paper_table


def test_registry_covers_the_five_modalities_with_medmnist_class_names():
    import medmnist

    assert set(MODALITIES) == {"blood", "breast", "retina", "oct", "pneumonia"}
    for modality in MODALITIES.values():
        assert modality.medmnist_flag in medmnist.INFO
    # Pneumonia takes medmnistc's own list.
    from medmnistc.corruptions.registry import CORRUPTIONS_DS

    assert modality_corruptions(MODALITIES["pneumonia"]) == tuple(CORRUPTIONS_DS["pneumoniamnist"])


def test_medimeta_reader_reads_the_test_split_and_its_class_names(tmp_path):
    write_medimeta(tmp_path, "mammo_mass", "pathology", ["benign", "malignant"], 6)
    data = MedIMetaImages(tmp_path, "mammo_mass", "pathology")
    assert data.classnames == ["benign", "malignant"] and len(data) == 6
    import h5py

    with h5py.File(tmp_path / "mammo_mass" / "images.hdf5") as h5:
        first = h5["images"][3]  # the test split starts at image 3
    image, label = data[0]
    np.testing.assert_array_equal(np.asarray(image), first)
    assert label == 3 % 2
    with pytest.raises(InputError, match=r"no task 'nope'; tasks: \['pathology'\]"):
        MedIMetaImages(tmp_path, "mammo_mass", "nope")
    with pytest.raises(
        InputError, match=r"MedIMeta data set 'fundus' not found: expected .*fundus/info.yaml; found \['mammo_mass'\]"
    ):
        MedIMetaImages(tmp_path, "fundus", "disease_presence")


def test_medmnistc_layouts_and_severity_blocks(tmp_path):
    write_medmnistc_stacked(tmp_path, "breastmnist", "pixelate", 4, 2)
    for severity in (1, 3, 5):
        data = read_medmnistc_file(tmp_path, "breastmnist", "pixelate", severity)
        assert len(data) == 4 and all(int(np.asarray(data[i][0]).max()) == 40 * severity for i in range(4))
    (tmp_path / "breastmnist" / "test").mkdir()
    write_medmnist_npz(tmp_path / "breastmnist" / "test" / "motion_blur_severity_2.npz", 5, 2)
    assert len(read_medmnistc_file(tmp_path, "breastmnist", "motion_blur", 2)) == 5
    with pytest.raises(
        InputError, match=r"expected .*breastmnist/jpeg_compression.npz .* or .*jpeg_compression_severity_1.npz"
    ):
        read_medmnistc_file(tmp_path, "breastmnist", "jpeg_compression", 1)


def test_on_the_fly_corruption_is_medmnistc_and_reproducible(tmp_path):
    from medmnistc.corruptions.registry import CORRUPTIONS_DS
    from torch.utils.data import DataLoader

    write_medmnist_npz(tmp_path / "x.npz", 6, 2, size=224)
    base = read_medmnist_npz(tmp_path / "x.npz")
    pixelated = CorruptedOnTheFly(base, "breastmnist", "pixelate", 3)
    expected = CORRUPTIONS_DS["breastmnist"]["pixelate"].apply(base[0][0], 2)  # severity 3 = index 2
    np.testing.assert_array_equal(np.asarray(pixelated[0][0]), np.asarray(expected, dtype=np.uint8))
    noisy = CorruptedOnTheFly(base, "breastmnist", "speckle_noise", 4, seed=5)
    first = [np.asarray(noisy[i][0]) for i in range(6)]
    assert not np.array_equal(first[0], np.asarray(base[0][0]))
    to_array = lambda batch: [np.asarray(image) for image, _ in batch]  # noqa: E731
    in_workers = [a for batch in DataLoader(noisy, batch_size=2, num_workers=2, collate_fn=to_array) for a in batch]
    for a, b in zip(first, in_workers):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"'bubble' is not a medmnistc corruption of breastmnist"):
        CorruptedOnTheFly(base, "breastmnist", "bubble", 1)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "imagefolder"])
def test_hf_dataset_and_image_folders(tmp_path, layout):
    import datasets

    images = [Image.fromarray(np.full((28, 28, 3), 20 * i, np.uint8)) for i in range(6)]
    labels = [i % 3 for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    data = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    folder = tmp_path / layout
    if layout == "save_to_disk":
        datasets.DatasetDict({"test": data}).save_to_disk(str(folder))
    elif layout == "parquet":
        folder.mkdir()
        data.to_parquet(str(folder / "test.parquet"))
    else:
        for i, (image, label) in enumerate(zip(images, labels)):
            (folder / "test" / "abc"[label]).mkdir(parents=True, exist_ok=True)
            image.save(folder / "test" / "abc"[label] / f"{i}.png")
    read = ImageFolder(folder, labelled=True, split="test") if layout == "imagefolder" else HFImages(folder)
    assert len(read) == 6 and read.classnames == ["a", "b", "c"]
    pairs = sorted((int(np.asarray(img)[0, 0, 0]), label) for img, label in (read[i] for i in range(6)))
    assert pairs == [(20 * i, i % 3) for i in range(6)]


def test_datamodule_builds_every_split_of_a_modality(tmp_path):
    write_modality_data(tmp_path, "breastmnist", ("mammo_mass", "pathology"), ["pixelate", "motion_blur"])
    data = EvaluationDataModule(
        root=str(tmp_path),
        modality="breast",
        corruptions=["pixelate", "motion_blur"],
        severities=[1, 4],
        size=28,
        image_size=28,
    )
    data.setup("test")
    assert data.split_names == [
        "in_domain",
        "base_to_novel",
        "pixelate@1",
        "pixelate@4",
        "motion_blur@1",
        "motion_blur@4",
    ]
    assert data.split_classnames["in_domain"] == ["malignant", "normal, benign"]
    assert data.split_classnames["base_to_novel"] == ["novel class 0", "novel class 1", "novel class 2"]
    assert [len(d) for d in data.datasets.values()] == [10] * 6
    assert data.templates[0] == MODALITIES["breast"].templates[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"modality": "skin"}, "unknown modality 'skin'"),
        ({"modality": "breast", "splits": ["in_domain", "ood"]}, "unknown split kind\\(s\\) \\['ood'\\]"),
        ({"modality": "breast", "severities": [0, 6]}, "\\[0, 6\\] outside 1..5"),
        ({}, "give a modality, or sources"),
        ({"modality": ["blood", "oct", "blood"]}, r"data.modality: \['blood'\] given more than once"),
        ({"modality": ["blood", "oct"], "classnames": ["a", "b"]}, "each split takes its own modality's names"),
        (
            {"modality": "breast", "templates": ["a photo"]},
            r"data.templates: 'a photo' has 0 replacement field\(s\) \[\]; each template needs exactly one \{\}",
        ),
    ],
)
def test_bad_data_options_are_named(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        EvaluationDataModule(root=str(tmp_path), **kwargs)


def test_predict_refuses_several_modalities(tmp_path):
    data = EvaluationDataModule(root=str(tmp_path), modality=["blood", "oct"], sources={"scans": "scans"})
    with pytest.raises(InputError, match=r"data\.modality: predict puts every source in one class set"):
        data.setup("predict")


def test_missing_protocol_data_is_reported_before_models_load(tmp_path):
    write_medmnist_npz(tmp_path / "octmnist.npz", 8, 4)
    data = EvaluationDataModule(root=str(tmp_path), modality="oct", splits=["in_domain", "base_to_novel"], size=28)
    with pytest.raises(InputError, match=r"MedIMeta data set 'oct' not found: expected .*medimeta/oct/info.yaml"):
        data.setup("test")


@pytest.fixture(scope="module")
def modality_runs(clip_pair, tmp_path_factory) -> dict[str, tuple[dict, Path, str]]:
    """Every modality config run end to end on tiny data (its first corruption at severities 1 and 2): results.json,
    the run's folder and the corruption, by modality."""
    runs = {}
    for modality, m in sorted(MODALITIES.items()):
        root = tmp_path_factory.mktemp(modality)
        corruption = modality_corruptions(m)[0]
        write_modality_data(root / "data", m.medmnist_flag, (m.medimeta_dataset, m.medimeta_task), [corruption])
        args = [
            "test",
            "--config",
            str(REPO / "configs" / f"{modality}.yaml"),
            "--model.arch=tcube-tiny-clip",
            f"--model.pretrained_checkpoint={clip_pair[0]}",
            f"--model.expert_checkpoint={clip_pair[1]}",
            "--model.methods=[zeroshot, expert, wise_ft, t3, t3_batch]",
            f"--data.root={root / 'data'}",
            "--data.size=28",
            "--data.image_size=28",
            "--data.num_workers=0",
            "--data.pin_memory=false",
            f"--data.corruptions=[{corruption}]",
            "--data.severities=[1, 2]",
            f"--trainer.default_root_dir={root / 'runs'}",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            "--trainer.enable_progress_bar=false",
            "--model.plots=false",
        ]
        runs[modality] = (*run_cli_in_process(args), corruption)
    return runs


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_each_modality_config_runs_end_to_end(modality_runs, modality):
    results, run_dir, corruption = modality_runs[modality]
    splits = ["in_domain", "base_to_novel", f"{corruption}@1", f"{corruption}@2"]
    assert list(results["accuracy"]) == [*splits, "stream"]  # the config's mix: in-domain and every corrupted split
    assert results["num_samples"] == dict.fromkeys(splits, 10) | {"stream": 30}
    assert list(results["sources"]["stream"]) == [splits[0], *splits[2:]]
    acc = results["accuracy"]
    # CE and mCE against the formula, from the reported accuracies (reference: zeroshot).
    ce = results["corruption_errors"]["ce"]
    for method in acc["in_domain"]:
        err = sum(1 - acc[f"{corruption}@{s}"][method] for s in (1, 2))
        ref = sum(1 - acc[f"{corruption}@{s}"]["zeroshot"] for s in (1, 2))
        assert ce[method][corruption] == pytest.approx(err / ref) and ce[method]["mCE"] == pytest.approx(err / ref)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["method"] for row in summary] == list(acc["in_domain"])
    assert summary[0]["corrupted_mean"] == pytest.approx(np.mean([acc[s]["zeroshot"] for s in splits[2:]]))
    columns = "method,in_domain,base_to_novel,stream,corrupted_mean,mCE,AURC,AURC (JS)"
    columns += ",guaranteed coverage (in-domain),guaranteed risk (in-domain)"  # calibrated on MedMNIST's val split
    columns += ",guaranteed coverage (shift),guaranteed risk (shift)"
    assert (run_dir / "summary.csv").read_text().splitlines()[0] == columns
    assert "| " + " | ".join(columns.split(",")) + " |" in (run_dir / "summary.md").read_text()
    metrics = results["metrics"]["base_to_novel"]["t3"]
    assert set(metrics) >= {"top1", "balanced_accuracy"} and metrics["top1"] == acc["base_to_novel"]["t3"]


def test_the_papers_table_across_the_five_modalities(modality_runs, tmp_path, capsys):
    runs = [run_dir for _, run_dir, _ in modality_runs.values()]
    paper_table.main([*map(str, runs), "--out", str(tmp_path / "table")])
    with open(tmp_path / "table" / "table.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["zeroshot", "expert", "wise_ft@0.5", "t3", "t3_batch"]
    for method, row in rows.items():
        for modality, (results, _, corruption) in modality_runs.items():
            accuracy = results["accuracy"]
            assert float(row[f"{modality}/in_domain"]) == pytest.approx(accuracy["in_domain"][method])
            assert float(row[f"{modality}/base_to_novel"]) == pytest.approx(accuracy["base_to_novel"][method])
            corrupted = np.mean([accuracy[f"{corruption}@{s}"][method] for s in (1, 2)])
            assert float(row[f"{modality}/corrupted"]) == pytest.approx(corrupted)
            assert float(row[f"{modality}/mCE"]) == pytest.approx(results["corruption_errors"]["ce"][method]["mCE"])
        for quantity in ("in_domain", "base_to_novel", "corrupted", "mCE"):
            mean = np.mean([float(row[f"{modality}/{quantity}"]) for modality in modality_runs])
            assert float(row[f"mean/{quantity}"]) == pytest.approx(mean)
    markdown = (tmp_path / "table" / "table.md").read_text()
    t3 = rows["t3"]
    assert f"| t3 | {100 * float(t3['blood/in_domain']):.2f} |" in markdown
    assert all(str(run / "results.json") in markdown for run in runs)  # the runs read, listed
    latex = (tmp_path / "table" / "table.tex").read_text()
    assert "\\begin{tabular}" in latex and "t3\\_batch & " in latex and "\\multicolumn{4}{c}{mean}" in latex
    # Runs that do not fit together are said, not mixed.
    for bad, message in (
        ([runs[0], runs[0]], "modalities given more than once: ['blood']"),
        ([runs[0], tmp_path], "no results.json"),
    ):
        with pytest.raises(SystemExit) as stop:
            paper_table.main([*map(str, bad), "--out", str(tmp_path / "bad")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    other = tmp_path / "other" / "results.json"
    other.parent.mkdir()
    edited = json.loads((runs[1] / "results.json").read_text())
    edited["config"]["model"]["gamma"] = 4.0
    other.write_text(json.dumps(edited))
    with pytest.raises(SystemExit):
        paper_table.main([str(runs[0]), str(other), "--out", str(tmp_path / "bad")])
    assert "model.gamma: 0.5 (blood) vs 4.0 (breast)" in capsys.readouterr().err
    edited["config"]["data"]["modality"] = ["blood", "breast"]  # a run of several modalities (K experts)
    other.write_text(json.dumps(edited))
    (tmp_path / "a_file").write_text("")
    for args, message in (
        ([str(other)], "a run of several modalities ['blood', 'breast']; the table takes one run per modality"),
        ([str(runs[0]), "--out", str(tmp_path / "a_file")], "--out: " + str(tmp_path / "a_file") + " is a file"),
        ([str(runs[0]), "--out", "/proc/tcube_table"], "--out: cannot create the folder /proc/tcube_table"),
        ([*map(str, runs), "--out", str(tmp_path / "table")], "already holds ['table.md', 'table.csv', 'table.tex']"),
    ):
        with pytest.raises(SystemExit) as stop:
            paper_table.main(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and (tmp_path / "a_file").read_text() == ""
    paper_table.main([*map(str, runs), "--out", str(tmp_path / "table"), "--overwrite"])  # asked: replaced


def test_on_the_fly_and_hf_sources_through_the_cli(clip_pair, tmp_path):
    import datasets

    write_medmnist_npz(tmp_path / "breastmnist.npz", 8, 2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    images = [Image.fromarray(np.full((28, 28, 3), 9 * i, np.uint8)) for i in range(7)]
    hf = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(7)]}, features=features)
    hf.save_to_disk(str(tmp_path / "extra"))
    args = [
        "test",
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        "--model.methods=[zeroshot, t3]",
        f"--data.root={tmp_path}",
        "--data.modality=breast",
        "--data.splits=[in_domain, corrupted]",
        "--data.size=28",
        "--data.image_size=28",
        "--data.corruption_source=on_the_fly",
        "--data.corruptions=[speckle_noise]",
        "--data.severities=[5]",
        '--data.sources={"extra": "extra"}',
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
        "--model.plots=false",
    ]
    results, _ = run_cli_in_process(args)
    assert results["num_samples"] == {"in_domain": 8, "speckle_noise@5": 8, "extra": 7}
    again, _ = run_cli_in_process([a.replace("runs", "runs2") for a in args])
    assert again["accuracy"] == results["accuracy"]  # seeded corruptions: same results


def test_on_the_fly_corruptions_are_cached_when_asked(tmp_path):
    write_medmnist_npz(tmp_path / "breastmnist.npz", 5, 2)
    options = {
        "root": str(tmp_path),
        "modality": "breast",
        "splits": ["corrupted"],
        "corruptions": ["speckle_noise"],
        "severities": [2],
        "size": 28,
        "image_size": 28,
        "corruption_source": "on_the_fly",
        "corruption_cache": str(tmp_path / "cache"),
    }
    first = EvaluationDataModule(**options)
    first.setup("test")
    cached = tmp_path / "cache" / "breastmnist" / "test" / "speckle_noise_severity_2_seed_0.npz"
    assert cached.is_file()
    fresh = CorruptedOnTheFly(read_medmnist_npz(tmp_path / "breastmnist.npz"), "breastmnist", "speckle_noise", 2)
    with np.load(cached) as npz:
        for i in range(5):
            np.testing.assert_array_equal(npz["test_images"][i], np.asarray(fresh[i][0]))
    stamp = cached.stat().st_mtime_ns
    second = EvaluationDataModule(**options)
    second.setup("test")
    assert cached.stat().st_mtime_ns == stamp  # read back, not regenerated
    torch.testing.assert_close(
        second.datasets["speckle_noise@2"][3]["image"], first.datasets["speckle_noise@2"][3]["image"]
    )


def test_plots_are_written_and_logged_to_tensorboard(clip_pair, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_modality_data(tmp_path / "data", "breastmnist", ("mammo_mass", "pathology"), ["pixelate"])
    args = [
        "test",
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        "--model.methods=[zeroshot, expert, t3]",
        f"--data.root={tmp_path / 'data'}",
        "--data.modality=breast",
        "--data.size=28",
        "--data.image_size=28",
        "--data.splits=[in_domain, corrupted]",
        "--data.corruptions=[pixelate]",
        "--data.severities=[1, 2]",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]
    _, run_dir = run_cli_in_process(args)
    splits = ("in_domain", "pixelate@1", "pixelate@2")
    names = ("coefficients", "js_vs_dawin", "confidence_vs_js", "risk_coverage")
    per_split = {f"{split}/{name}" for split in splits for name in names}
    expected = {"accuracy_heatmap", "lambda_histograms", "severity_pixelate", *per_split}
    plots = run_dir / "plots"
    assert {str(p.relative_to(plots).with_suffix("")) for p in plots.rglob("*.png")} == expected
    for stem in expected:
        with Image.open(run_dir / "plots" / f"{stem}.png") as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5  # something is drawn
    with Image.open(run_dir / "plots" / "severity_pixelate.png") as image:
        assert image.size == (800, 400)  # 8 × 4 inches at 100 dpi: the axes, and the legend beside them
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert {f"plots/{stem}" for stem in expected} <= set(events.Tags()["images"])


def test_the_paper_table_command_imports_neither_torch_nor_lightning():
    """It reads results files: starting it costs a fraction of a second, not Lightning's import (a fresh process)."""
    loaded = "[m for m in ('torch', 'lightning') if m in sys.modules]"
    code = f"import sys, tcube_lightning.reporting.paper_table; print({loaded})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
