"""``main.py inspect``: every form the loader accepts is named with what it fits and how it was mapped, the towers'
relative change against NumPy norms of the state_dicts, and what cannot be read is one line each, exit 2."""

import json

import numpy as np
import open_clip
import pytest
import torch

from helpers import ARCH
from model_sources import write_robustmedclip, write_transformers_clips
from tcube_lightning.cli.entry import main


def inspect(capsys, *args) -> tuple[int, list[dict], str]:
    """The command's exit status, its JSON reports and what it said on stderr."""
    capsys.readouterr()
    code = 0
    try:
        main(["inspect", "--json", *map(str, args)])
    except SystemExit as stop:
        code = stop.code
    printed = capsys.readouterr()
    return code, [json.loads(line) for line in printed.out.splitlines()], printed.err


def relative_changes(pt: dict, ft: dict) -> dict[str, float]:
    """‖θ − θ_pt‖ / ‖θ_pt‖ per tower (the image tower's parameters start with ``visual.``), logit scale left out."""
    changes = {}
    for tower, keep in (("image", lambda k: k.startswith("visual.")), ("text", lambda k: not k.startswith("visual."))):
        names = [k for k in pt if keep(k) and k != "logit_scale" and pt[k].is_floating_point()]
        change = np.sqrt(sum(((ft[k].double() - pt[k].double()) ** 2).sum().item() for k in names))
        changes[tower] = change / np.sqrt(sum((pt[k].double() ** 2).sum().item() for k in names))
    return changes


@pytest.fixture(scope="module")
def files(clip_pair, expert_team, tmp_path_factory):
    """One file of every layout the loader reads, and three it refuses."""
    folder = tmp_path_factory.mktemp("inspected")
    pt, ft = (torch.load(p, weights_only=True) for p in clip_pair)
    torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in ft.items()}}, folder / "lightning.ckpt")
    torch.save({"ema": ft, "model": pt}, folder / "two.pt")
    tpt = {("image_encoder." + k[7:] if k.startswith("visual.") else "text_encoder." + k): v for k, v in ft.items()}
    tpt = {k: v for k, v in tpt.items() if not k.endswith(("token_embedding.weight", "logit_scale"))}
    torch.save({**tpt, "prompt_learner.ctx": torch.zeros(4, 64)}, folder / "tpt.pt")
    (folder / "notes.txt").write_text("not a checkpoint\n")
    whole = (folder / "lightning.ckpt").read_bytes()
    (folder / "cut.pt").write_bytes(whole[: len(whole) // 2])
    torch.save(open_clip.create_model(ARCH), folder / "pickled.pt")
    return folder


def test_state_dicts_name_the_config_their_shapes_fit_and_the_prefix_to_strip(clip_pair, files, capsys):
    code, reports, _ = inspect(capsys, clip_pair[0], files / "lightning.ckpt", files / "tpt.pt")
    assert code == 0
    plain, lightning, tpt = reports
    assert plain["fits"] == [ARCH] and plain["shapes"]["image size"] == 28 and plain["shapes"]["vision layers"] == 2
    assert plain["mapping"] == {"stripped": None, "layout": "open_clip"}
    assert lightning["fits"] == [ARCH] and lightning["mapping"]["stripped"] == "state_dict.model._orig_mod."
    assert tpt["fits"] == [ARCH] and tpt["mapping"]["layout"] == "prompt learner"


def test_against_the_generalist_each_towers_change_and_the_learned_context(clip_pair, files, capsys):
    code, reports, _ = inspect(capsys, files / "lightning.ckpt", files / "tpt.pt", "--generalist", clip_pair[0])
    assert code == 0
    pt, ft = (torch.load(p, weights_only=True) for p in clip_pair)
    assert reports[0]["relative_change"] == pytest.approx(relative_changes(pt, ft), rel=1e-12)
    assert reports[0]["architecture"] == ARCH
    assert reports[1]["learned_context"] == {"n_ctx": 4, "width": 64}
    assert sorted(reports[1]["mapping"]["from_generalist"]) == ["logit_scale", "token_embedding.weight"]
    assert reports[1]["relative_change"]["image"] == pytest.approx(reports[0]["relative_change"]["image"])


def test_adapters_folders_and_choices_are_named(clip_pair, expert_team, biomedclip, files, tmp_path, capsys):
    clips = write_transformers_clips(tmp_path)
    code, (peft,), _ = inspect(capsys, expert_team["lora_a"][0], "--generalist", clip_pair[0])
    assert code == 0
    code, (transformers,), _ = inspect(capsys, clips["pt"])  # a CLIPModel: its config's shapes
    assert code == 0
    assert peft["format"] == "peft LoRA adapter" and peft["lora"]["rank"] == [2]
    assert peft["lora"]["targets"] and all(t.endswith("c_fc.weight") for t in peft["lora"]["targets"])
    pt = torch.load(clip_pair[0], weights_only=True)  # against peft's own merge of the adapter
    assert peft["relative_change"] == pytest.approx(relative_changes(pt, expert_team["lora_a"][1]), rel=1e-9)
    assert transformers["format"] == "transformers CLIPModel" and "shapes" in transformers
    schema = f"local-dir:{biomedclip['folder']}"
    write_robustmedclip(open_clip.create_model(schema).eval(), tmp_path / "model.pth")
    code, reports, said = inspect(capsys, tmp_path / "model.pth", biomedclip["expert"], "--arch", schema)
    assert code == 0, said
    assert reports[0]["format"] == "RobustMedCLIP LoRA checkpoint"
    assert reports[1]["architecture"] == schema and reports[1]["mapping"]["layout"] == "open_clip"
    code, _, said = inspect(capsys, files / "two.pt", "--arch", ARCH)
    assert code == 2 and "under 2 prefixes ('ema.', 'model.'" in said
    code, reports, _ = inspect(capsys, files / "two.pt", "--arch", ARCH, "--key_prefix", "model.")
    assert code == 0 and reports[0]["mapping"]["stripped"] == "model."


def test_what_cannot_be_read_is_one_line_each_and_exit_2(clip_pair, files, capsys):
    code, reports, said = inspect(capsys, files / "notes.txt", files / "cut.pt", files / "pickled.pt", clip_pair[0])
    assert code == 2 and len(reports) == 1  # the readable file is still reported
    lines = said.splitlines()
    assert len(lines) == 3 and all(line.startswith("tcube-lightning: error: checkpoint: ") for line in lines)
    assert "notes.txt is not a checkpoint file" in lines[0]
    assert "cut.pt could not be read as a checkpoint (PytorchStreamReader failed" in lines[1]
    assert "pickled.pt is a whole pickled module (open_clip.model.CLIP)" in lines[2]
    code, reports, said = inspect(capsys, clip_pair[0], "--jsn")  # a misspelt option: as every command says it
    assert code == 2 and not reports
    assert said.splitlines() == [
        "tcube-lightning: error: unrecognized arguments: --jsn (did you mean --json?)",
        "See `main.py inspect --help` for the options.",
    ]
    code, _, said = inspect(capsys, clip_pair[0], "--generalist", files / "nowhere.pt")
    assert code == 2 and said.strip() == f"tcube-lightning: error: --generalist: file not found: {files}/nowhere.pt"
