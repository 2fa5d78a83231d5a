"""The fused store against open_clip models built from explicitly interpolated state_dicts."""

import open_clip
import pytest
import torch
from conftest import ARCH, CLASSNAMES, TEMPLATES

from tcube_lightning.errors import InputError
from tcube_lightning.merging import FusedParameterStore
from tcube_lightning.models import clip_logits, load_clip, tokenize_prompts, zero_shot_head


def oracle_logits(pt_sd: dict, ft_sd: dict, w: float, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits of a fresh open_clip model loaded from (1 − w)·θ_pt + w·θ_ft, written out by hand."""
    model = open_clip.create_model(ARCH).eval()
    merged = {k: (1 - w) * pt_sd[k] + w * ft_sd[k] if pt_sd[k].is_floating_point() else pt_sd[k] for k in pt_sd}
    model.load_state_dict(merged)
    with torch.no_grad():
        text = model.encode_text(tokens, normalize=True).reshape(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
        text = text / text.norm(dim=-1, keepdim=True)
        image = model.encode_image(images, normalize=True)
        return model.logit_scale.exp() * image @ text.T


@pytest.fixture(scope="module")
def store(clip_pair):
    return FusedParameterStore(load_clip(ARCH, clip_pair[0]), load_clip(ARCH, clip_pair[1]))


# Tolerances: fp32, logits at CLIP's scale 100; rounding of θ_pt + w·Δ versus (1 − w)·θ_pt + w·θ_ft differs by
# an ulp per parameter, which the scale turns into ~1e-5 on the logits.
@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_merged_forward_equals_interpolated_state_dict(store, clip_pair, w):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(ARCH, CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        model = store.merge(w)
        ours = clip_logits(model, images, zero_shot_head(model, tokens, len(CLASSNAMES)))
    torch.testing.assert_close(ours, oracle_logits(pt_sd, ft_sd, w, images, tokens), atol=1e-5, rtol=1e-5)


def test_source_models_are_views_of_the_flat_buffers(store, clip_pair):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    for name, param in store.pretrained.named_parameters():
        torch.testing.assert_close(param, pt_sd[name], atol=0, rtol=0)
    for name, param in store.expert.named_parameters():
        torch.testing.assert_close(param, ft_sd[name], atol=0, rtol=0)
    first = next(store.working.parameters())
    assert first.untyped_storage().data_ptr() == store.merged_flat.untyped_storage().data_ptr()


def test_merge_writes_in_place_without_new_storage(store):
    pointer = store.merged_flat.data_ptr()
    store.merge(0.25)
    store.merge(0.75)
    assert store.merged_flat.data_ptr() == pointer
    expected = store.pt_flat + 0.75 * (store.ft_flat - store.pt_flat)
    torch.testing.assert_close(store.merged_flat, expected)


def test_moving_the_store_rebinds_the_views(clip_pair):
    store = FusedParameterStore(load_clip(ARCH, clip_pair[0]), load_clip(ARCH, clip_pair[1])).double()
    store.merge(0.4)
    param = next(store.working.parameters())
    assert param.dtype == torch.float64
    assert param.untyped_storage().data_ptr() == store.merged_flat.untyped_storage().data_ptr()


def test_mismatched_architectures_are_rejected_with_the_differences(clip_pair):
    other = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(InputError, match="same parameters.*First differences"):
        FusedParameterStore(load_clip(ARCH, clip_pair[0]), other)
