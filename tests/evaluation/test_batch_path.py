"""The batch path as a function of data: a plain split's and a mix's batches through ``BatchEvaluation`` and the
clustered second pass, with no Trainer and no LightningModule around them, give the per-sample columns the command
line writes for the same batches (its per-sample export), value for value."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ARCH, SPLITS, TEMPLATES, cli_args, run_cli_in_process
from tcube_lightning.data.datamodule import EvaluationDataModule
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import tokenize_prompts
from tcube_lightning.evaluation.batches import BatchEvaluation
from tcube_lightning.evaluation.clustered import ClusteredPass
from tcube_lightning.evaluation.splits import class_sets, split_sources
from tcube_lightning.loading import plan_models
from tcube_lightning.merging.coefficients import LambdaMapping
from tcube_lightning.merging.methods import build_methods
from tcube_lightning.reporting.samples import read_table

GAMMA = 20.0
BATCH = 8
METHODS = ["zeroshot", "expert", "ensemble", "wise_ft@0.5", "t3", "t3_batch", "dawin", "t3_cluster"]


@pytest.fixture(scope="module")
def data(npz_root, tmp_path_factory):
    """The npz splits and a mix of split "a" with an image folder of another class set (3 classes)."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(3)
    for i in range(11):
        name = ["bone", "lung", "skin"][i % 3]
        (folder / name).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return {**SPLITS, "scans": str(folder)}


@pytest.fixture(scope="module")
def cli_run(clip_pair, npz_root, data, tmp_path_factory):
    """The same splits through the command line, every per-sample column exported."""
    out = tmp_path_factory.mktemp("cli")
    base = [a for a in cli_args(clip_pair, npz_root, out) if not a.startswith(("--data.sources", "--data.classnames"))]
    args = [
        *base,
        f"--data.sources={json.dumps(data)}",
        '--data.mixes={"m": ["a", "scans"]}',
        "--data.flag=octmnist",
        f"--data.batch_size={BATCH}",
        f"--model.gamma={GAMMA}",
        f"--model.methods=[{', '.join(sorted({m.split('@')[0] for m in METHODS}))}]",
        "--model.export_samples=true",
        "--model.diagnose_extremes=false",
    ]
    return run_cli_in_process(args)[1]


def test_batches_through_the_function_give_the_command_lines_per_sample_columns(clip_pair, npz_root, data, cli_run):
    datamodule = EvaluationDataModule(
        str(npz_root), sources=data, mixes={"m": ["a", "scans"]}, flag="octmnist", templates=TEMPLATES,
        image_size=28, batch_size=BATCH,
    )  # fmt: skip
    datamodule.setup("test")  # no Trainer: one process's loaders
    sources = {split: split_sources(split, datamodule) for split in datamodule.split_names}
    sets, split_sets = class_sets(sources)
    loaded = plan_models(ARCH, str(clip_pair[0]), str(clip_pair[1])).load()
    tokenizer = plan_models(ARCH, str(clip_pair[0]), str(clip_pair[1])).architecture.tokenizer()
    engine = TCubeEngine(
        loaded.pretrained,
        list(loaded.experts.values()),
        [tokenize_prompts(tokenizer, list(names), list(templates)) for names, templates in sets],
        [len(names) for names, _ in sets],
        LambdaMapping(gamma=GAMMA),
    )
    every = build_methods()
    methods = {name: every[name] for name in METHODS}
    static = {name: m.static_rule for name, m in methods.items() if m.is_static}
    engine.prepare(static, extremes=False, weight_range=engine.weight_range(methods.values()))
    families = {m.family for m in methods.values()}
    weight_methods = {n: m for n, m in every.items() if m.merge_weights and (m.per_sample or m.family in families)}
    evaluate = BatchEvaluation(engine, methods, weight_methods)
    clustered = ClusteredPass({"t3_cluster": methods["t3_cluster"]}, datamodule.split_names, [""], clusters=3)
    loaders = dict(zip(datamodule.split_names, datamodule.test_dataloader(), strict=True))
    for split in ("a", "m"):
        width = max(len(sets[c][0]) for c in split_sets[split])
        parts = []
        for step, batch in enumerate(loaders[split]):
            index = step * BATCH + torch.arange(len(batch["label"]))
            for group in evaluate(batch, split_sets[split], index).groups:
                clustered.keep(split, group.columns["index"], group.shared, width)
                parts.append(group.columns)
        fit, offset = clustered.fit(split, rank=0), 0
        for batch in loaders[split]:  # the second pass, over the same batches
            for group in clustered.predict(engine, batch, split_sets[split], fit, offset):
                parts.append(group.columns)
                offset += len(group.labels)
        ours = table_by_index(parts)
        exported = read_table(cli_run / "samples" / f"{split}.npz")
        compared = [c for c in exported if not c.startswith("coverage/")]
        assert sorted(compared) == sorted(ours), split
        assert len(ours["index"]) == {"a": 37, "m": 48}[split]
        for column in compared:
            np.testing.assert_array_equal(ours[column], exported[column], err_msg=f"{split}: {column}")


def table_by_index(parts: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The groups' columns as one table in index order (a second pass's columns joined on index)."""
    table: dict[str, np.ndarray] = {}
    for names in {tuple(sorted(part)) for part in parts}:
        same = [part for part in parts if tuple(sorted(part)) == names]
        columns = {name: torch.cat([part[name] for part in same]) for name in names}
        order = columns["index"].argsort()
        table |= {name: values[order].numpy() for name, values in columns.items()}
    return table
