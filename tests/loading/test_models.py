"""Loading open_clip checkpoints from disk (every format), and zero-shot heads."""

import json

import open_clip
import pytest
import torch

from helpers import ARCH, CLASSNAMES, TEMPLATES, write_hub_cache
from tcube_lightning.engine.zero_shot import tokenize_prompts, zero_shot_head
from tcube_lightning.errors import InputError
from tcube_lightning.loading import load_clip


def test_training_style_checkpoint_with_module_prefix_loads(clip_pair, tmp_path):
    state = torch.load(clip_pair[0], weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    model = load_clip(ARCH, tmp_path / "train.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)


def test_unknown_architecture_lists_close_names():
    with pytest.raises(InputError, match=r"no model config named 'ViT-B-99'.*ViT-B"):
        load_clip("ViT-B-99", "nothing.pt")


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path):
    with pytest.raises(InputError, match=r"checkpoint: file not found"):
        load_clip(ARCH, tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match=r"junk.pt is not a checkpoint file"):
        load_clip(ARCH, tmp_path / "junk.pt")
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02 a pickle cut short")  # looks like one, does not load
    with pytest.raises(InputError, match=r"cut.pt could not be read as a checkpoint \(Unsupported operand"):
        load_clip(ARCH, tmp_path / "cut.pt")


def test_zero_shot_head_averages_normalised_template_embeddings(clip_pair):
    model = load_clip(ARCH, clip_pair[0])
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        head = zero_shot_head(model, tokens, len(CLASSNAMES))
        tokenizer = open_clip.get_tokenizer(ARCH)
        for c, name in enumerate(CLASSNAMES):
            emb = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            torch.testing.assert_close(head[c], mean / mean.norm())


def test_safetensors_checkpoint_loads(clip_pair, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(clip_pair[1], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "expert.safetensors")
    model = load_clip(ARCH, tmp_path / "expert.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)


# OpenAI's layout: open_clip's own converter infers heads = width / 64, so this config matches what it builds.
OPENAI_STYLE = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


class TorchScriptCLIP(torch.nn.Module):
    """What OpenAI ships: a TorchScript archive of CLIP, half-precision weights, three metadata entries."""

    def __init__(self, model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, value in model.named_parameters(recurse=False):
            self.register_parameter(name, value)
        for name, value in (("input_resolution", 28), ("context_length", 32), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return x * self.logit_scale


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    (folder / "tcube-openai-style.json").write_text(json.dumps(OPENAI_STYLE))
    open_clip.add_model_config(folder / "tcube-openai-style.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("tcube-openai-style")
    open_clip.model.convert_weights_to_fp16(clip)
    model = TorchScriptCLIP(clip)
    torch.jit.save(torch.jit.trace(model, torch.ones(1)), folder / "ViT-tiny.pt")
    return folder / "ViT-tiny.pt"


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the archive the way OpenAI did
def test_openai_torchscript_archive_loads_as_open_clip_converts_it(openai_archive):
    model = load_clip("tcube-openai-style", openai_archive)
    oracle = open_clip.load_openai_model(str(openai_archive), precision="fp32", device="cpu")
    assert set(model.state_dict()) == set(oracle.state_dict())
    for name, value in oracle.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0, msg=name)
    images, tokens = torch.randn(3, 3, 28, 28), open_clip.get_tokenizer("tcube-openai-style")(["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oracle.encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), oracle.encode_text(tokens))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the archive the way OpenAI did
def test_openai_archive_needs_a_quickgelu_architecture(openai_archive, tmp_path):
    config = {**OPENAI_STYLE, "quick_gelu": False}
    (tmp_path / "tcube-openai-gelu.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tcube-openai-gelu.json")
    with pytest.raises(InputError, match=r"trained with QuickGELU .* 'tcube-openai-gelu'.*\"quick_gelu\": true"):
        load_clip("tcube-openai-gelu", openai_archive)


def test_pretrained_tag_loads_from_the_local_cache(clip_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, {"cached": {"hf_hub": "tcube/tiny-clip/"}})
    with pytest.raises(InputError, match=r"tag 'cached' of 'tcube-tiny-clip' is not in the local cache"):
        load_clip(ARCH, "cached", cache_dir=str(tmp_path))
    write_hub_cache(tmp_path, "tcube/tiny-clip", clip_pair[0])
    model = load_clip(ARCH, "cached", cache_dir=str(tmp_path))
    state = torch.load(clip_pair[0], weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)


def test_pretrained_tag_with_the_wrong_activation_and_unknown_tags_are_refused():
    with pytest.raises(InputError, match=r"tag 'openai' was trained with QuickGELU .* use 'ViT-B-16-quickgelu'"):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(InputError, match=r"file not found: laion9 .*pretrained tag of 'ViT-B-16': .*'openai'"):
        load_clip("ViT-B-16", "laion9")
