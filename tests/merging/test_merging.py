"""The fused store against open_clip models built from explicitly interpolated state_dicts, with one expert and with
several (full and LoRA mixed)."""

import open_clip
import pytest
import torch

from helpers import ARCH, CLASSNAMES, LOGITS_ATOL, TEMPLATES, oracle_logits, sum_atol
from tcube_lightning.engine.zero_shot import clip_logits, tokenize_prompts, zero_shot_head
from tcube_lightning.errors import InputError
from tcube_lightning.loading import load_clip, plan_models
from tcube_lightning.merging.store import ExpertStore


@pytest.fixture(scope="module")
def store(clip_pair):
    return ExpertStore(load_clip(ARCH, clip_pair[0]), [load_clip(ARCH, clip_pair[1])])


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_merged_forward_equals_interpolated_state_dict(store, clip_pair, w):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        model = store.merge(w)
        ours = clip_logits(model, images, zero_shot_head(model, tokens, len(CLASSNAMES)))
    torch.testing.assert_close(ours, oracle_logits(pt_sd, ft_sd, w, images, tokens), atol=LOGITS_ATOL, rtol=0)


def image_tower_only(pt_sd: dict, ft_sd: dict) -> dict:
    """The expert's image tower and logit scale on the generalist's text tower: an expert fine-tuned on images alone."""
    return {k: ft_sd[k] if k.startswith("visual.") or k == "logit_scale" else pt_sd[k] for k in pt_sd}


def test_a_text_tower_no_expert_changed_is_not_merged(clip_pair):
    """The common case, an expert fine-tuned on its image tower alone: the merge runs over what it changed (elsewhere
    every merge is the generalist, exactly), and merged models, static merges loaded from a flat vector included,
    still equal the interpolated state_dict."""
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    expert_sd = image_tower_only(pt_sd, ft_sd)
    expert = open_clip.create_model(ARCH).eval()
    expert.load_state_dict(expert_sd)
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), [expert])
    assert store.merged_names and all(n.startswith("visual.") or n == "logit_scale" for n in store.merged_names)
    assert store.merged_flat.numel() == sum(pt_sd[n].numel() for n in store.merged_names) < store.pt_flat.numel()
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    for w, model in ((0.3, lambda: store.merge(0.3)), (1.0, lambda: store.load(store.expert_flat(0)))):
        with torch.no_grad():
            merged = model()
            ours = clip_logits(merged, images, zero_shot_head(merged, tokens, len(CLASSNAMES)))
        expected = oracle_logits(pt_sd, expert_sd, w, images, tokens)
        torch.testing.assert_close(ours, expected, atol=LOGITS_ATOL, rtol=0)


def test_small_tensors_an_expert_left_unchanged_do_not_split_the_merge(clip_pair):
    """Biases the expert left as the generalist's lie between tensors it changed: they are merged too (to the
    generalist's values), so the merge stays one run of passes, and equals the interpolated state_dict."""
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    expert_sd = {k: pt_sd[k] if k.endswith(".bias") else ft_sd[k] for k in pt_sd}
    expert = open_clip.create_model(ARCH).eval()
    expert.load_state_dict(expert_sd)
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), [expert])
    assert len(store.merged_ranges) == 1 and "visual.transformer.resblocks.0.mlp.c_fc.bias" in store.merged_names
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        merged = store.merge(0.3)
        ours = clip_logits(merged, images, zero_shot_head(merged, tokens, len(CLASSNAMES)))
    torch.testing.assert_close(ours, oracle_logits(pt_sd, expert_sd, 0.3, images, tokens), atol=LOGITS_ATOL, rtol=0)


def test_without_merged_text_towers_the_text_tower_stays_the_generalists(clip_pair):
    """``text_tower=False`` (``merge_text`` false): merged models classify with the generalist's head, so their text
    tower is not merged; the image tower is, as the interpolated state_dict's."""
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), [load_clip(ARCH, clip_pair[1])], text_tower=False)
    assert {n for n in store.names if n.startswith("visual.")} < set(store.merged_names)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        merged = store.merge(0.4)
        text = merged.encode_text(tokens)
        torch.testing.assert_close(text, store.pretrained.encode_text(tokens), atol=0, rtol=0)
        ours = clip_logits(merged, images, zero_shot_head(merged, tokens, len(CLASSNAMES)))
    expected = oracle_logits(pt_sd, ft_sd, 0.4, images, tokens, text_model=store.pretrained)
    torch.testing.assert_close(ours, expected, atol=LOGITS_ATOL, rtol=0)


def test_source_models_are_views_of_the_flat_buffers(store, clip_pair):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    for name, param in store.pretrained.named_parameters():
        torch.testing.assert_close(param, pt_sd[name], atol=0, rtol=0)
    for name, param in store.expert_model(0).named_parameters():
        torch.testing.assert_close(param, ft_sd[name], atol=0, rtol=0)
    first = next(store.working.parameters())
    assert first.untyped_storage().data_ptr() == store.merged_flat.untyped_storage().data_ptr()


def test_merge_writes_in_place_without_new_storage(store):
    pointer = store.merged_flat.data_ptr()
    store.merge(0.25)
    store.merge(0.75)
    assert store.merged_flat.data_ptr() == pointer
    expected = store.pt_flat + 0.75 * (store.expert_flat(0) - store.pt_flat)
    torch.testing.assert_close(store.merged_flat, expected)


def test_moving_the_store_rebinds_the_views(clip_pair):
    """After a move (here to float64, after the merges of set-up) the working model's parameters are views into the
    moved buffers and a merge writes them: θ_pt + w·Δ of the state_dicts, in float64."""
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), [load_clip(ARCH, clip_pair[1])])
    store.merge(0.7)
    store = store.double()
    params = dict(store.merge(0.4).named_parameters())
    assert params["visual.proj"].dtype == torch.float64
    assert params["visual.proj"].untyped_storage().data_ptr() == store.merged_flat.untyped_storage().data_ptr()
    for name, param in params.items():
        expected = pt_sd[name].double() + 0.4 * (ft_sd[name].double() - pt_sd[name].double())
        torch.testing.assert_close(param, expected, atol=sum_atol(expected, 2), rtol=0)


def test_mismatched_architectures_are_rejected_with_the_differences(clip_pair):
    other = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(InputError, match=r"same parameters.*First differences"):
        ExpertStore(load_clip(ARCH, clip_pair[0]), [other])


def test_several_experts_merge_to_the_sum_of_their_task_vectors(clip_pair, expert_team, monkeypatch):
    """θ_pt + Σ_k w_k·(θ_k − θ_pt) for two full and two LoRA experts, each parameter against the state_dicts'
    arithmetic in float64, eager and compiled (``--model.compile``: dynamo's eager backend here, the generated
    kernel's own check is the merge benchmark's); every expert's own model is its θ_k."""
    names = ["full_a", "lora_a", "full_b", "lora_b"]
    loaded = plan_models(ARCH, str(clip_pair[0]), None, experts={n: str(expert_team[n][0]) for n in names}).load()
    store = ExpertStore(loaded.pretrained, list(loaded.experts.values()))
    pt_sd = torch.load(clip_pair[0], weights_only=True)
    states = [expert_team[n][1] for n in names]
    for k in range(store.count):
        model, flat = (
            store.expert_model(k),
            store.expert_flat(k),
        )  # what the static rules merge: a LoRA expert's materialised
        for name, param in model.named_parameters():  # W + s·B·A, in float32 by us and by peft: a few roundings
            torch.testing.assert_close(param, states[k][name], atol=sum_atol(states[k][name], 3), rtol=0)
            piece = flat[store.offsets[name] : store.offsets[name] + param.numel()].view_as(param)
            torch.testing.assert_close(piece, param, atol=0, rtol=0)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_(function, backend="eager", **options))
    for compiled in (False, True):
        if compiled:
            store.compile_merge()
        # eager: scaled and added, then convex (a chain of lerps); compiled: both one kernel
        for weights in ([0.3, 0.7, -0.2, 0.45], [0.1, 0.2, 0.3, 0.15]):
            for name, param in store.merge(weights).named_parameters():
                deltas = [sd[name].double() - pt_sd[name].double() for sd in states]
                expected = pt_sd[name].double() + sum(w * delta for w, delta in zip(weights, deltas))
                atol = sum_atol(pt_sd[name], 3 * len(states) + 1)  # at most 3 roundings per expert, and the scaling
                torch.testing.assert_close(param.double(), expected, atol=atol, rtol=0)
    assert store.merge_kernel is not None
    first = store.merge([0.0] * 4)
    for name, param in first.named_parameters():
        torch.testing.assert_close(param, pt_sd[name], atol=0, rtol=0)


def test_a_store_without_experts_is_refused(clip_pair):
    with pytest.raises(InputError, match="at least one expert"):
        ExpertStore(load_clip(ARCH, clip_pair[0]), [])
