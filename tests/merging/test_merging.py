"""The fused store against open_clip models built from explicitly interpolated state_dicts."""

import open_clip
import pytest
import torch

from helpers import ARCH, CLASSNAMES, LOGITS_ATOL, TEMPLATES, oracle_logits
from tcube_lightning.engine.zero_shot import clip_logits, tokenize_prompts, zero_shot_head
from tcube_lightning.errors import InputError
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.store import FusedParameterStore


@pytest.fixture(scope="module")
def store(clip_pair):
    return FusedParameterStore(load_clip(ARCH, clip_pair[0]), load_clip(ARCH, clip_pair[1]))


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_merged_forward_equals_interpolated_state_dict(store, clip_pair, w):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        model = store.merge(w)
        ours = clip_logits(model, images, zero_shot_head(model, tokens, len(CLASSNAMES)))
    torch.testing.assert_close(ours, oracle_logits(pt_sd, ft_sd, w, images, tokens), atol=LOGITS_ATOL, rtol=0)


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
    with pytest.raises(InputError, match=r"same parameters.*First differences"):
        FusedParameterStore(load_clip(ARCH, clip_pair[0]), other)
