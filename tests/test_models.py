"""Loading open_clip checkpoints from disk, and zero-shot heads."""

import open_clip
import pytest
import torch
from conftest import ARCH, CLASSNAMES, TEMPLATES

from tcube_lightning.errors import InputError
from tcube_lightning.models import check_architecture, load_clip, tokenize_prompts, zero_shot_head


def test_training_style_checkpoint_with_module_prefix_loads(clip_pair, tmp_path):
    state = torch.load(clip_pair[0], weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    model = load_clip(ARCH, tmp_path / "train.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)


def test_unknown_architecture_lists_close_names():
    with pytest.raises(InputError, match="no model config named 'ViT-B-99'.*ViT-B"):
        check_architecture("ViT-B-99")


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_clip(ARCH, tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="could not be loaded into open_clip architecture 'tcube-tiny-clip'"):
        load_clip(ARCH, tmp_path / "junk.pt")


def test_zero_shot_head_averages_normalised_template_embeddings(clip_pair):
    model = load_clip(ARCH, clip_pair[0])
    tokens = tokenize_prompts(ARCH, CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        head = zero_shot_head(model, tokens, len(CLASSNAMES))
        tokenizer = open_clip.get_tokenizer(ARCH)
        for c, name in enumerate(CLASSNAMES):
            emb = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            torch.testing.assert_close(head[c], mean / mean.norm())


def test_templates_need_a_placeholder():
    with pytest.raises(InputError, match="one '\\{\\}'"):
        tokenize_prompts(ARCH, CLASSNAMES, ["a photo"])


def test_safetensors_checkpoint_loads(clip_pair, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(clip_pair[1], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "expert.safetensors")
    model = load_clip(ARCH, tmp_path / "expert.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)
