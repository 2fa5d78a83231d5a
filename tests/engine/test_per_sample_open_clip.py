"""The per-sample pass on open_clip's own towers against explicit per-sample merges, across architecture variants;
what it cannot run is named."""

import json
import math

import open_clip
import pytest
import torch

from helpers import EMBEDDING_ATOL, LOGIT_SCALE, make_expert_state_dict, oracle_model, rounding_atol
from tcube_lightning.engine import row_merge
from tcube_lightning.engine.leaf_plan import leafwise_reason
from tcube_lightning.engine.per_sample import LeafWisePass, changed_parameters
from tcube_lightning.merging.store import ExpertStore


def tiny_config(**vision_text_extra) -> dict:
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    config = {"embed_dim": 48, "vision_cfg": vision, "text_cfg": text}
    for key, value in vision_text_extra.items():
        if key in ("quick_gelu",):
            config[key] = value
        else:
            vision[key] = value
            text[key] = value
    return config


VARIANTS = {
    "plain": tiny_config(),
    "quickgelu-layerscale": tiny_config(quick_gelu=True, ls_init_value=0.5),
    "avgpool-final-ln-after-pool": dict(
        tiny_config(), vision_cfg={**tiny_config()["vision_cfg"], "pool_type": "avg", "final_ln_after_pool": True}
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    name = f"tcube-test-{request.param}"
    path = tmp_path_factory.mktemp("configs") / f"{name}.json"
    path.write_text(json.dumps(VARIANTS[request.param]))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    pt = open_clip.create_model(name).eval()
    state = pt.state_dict()
    state["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE))
    pt.load_state_dict(state)
    ft = open_clip.create_model(name).eval()
    ft.load_state_dict(make_expert_state_dict(state, scale=0.2))
    return name, ExpertStore(pt, [ft])


def per_sample_pass(store, merged_per_row=False):
    """The pass over the store's generalist and expert; ``merged_per_row``: every Linear leaf merges its weight per
    row however few tokens its rows carry (the tiny towers' rows are below the rule's threshold)."""
    changed = changed_parameters(store.pretrained, store.expert_model(0))
    assert leafwise_reason(store.pretrained, set(changed)) is None  # open_clip's own towers: every tensor differs
    if not merged_per_row:
        return LeafWisePass(store.pretrained, [changed])
    vectorized = LeafWisePass(store.pretrained, [changed], stacked={n: store.stacked(n) for n in changed})
    vectorized.row_weights.threshold = 0
    return vectorized


def oracle(name, store, w):
    expert = {n: p.clone() for n, p in store.expert_model(0).state_dict().items()}
    return oracle_model(store.pretrained.state_dict(), expert, w, arch=name)


SCALE_RTOL = rounding_atol(math.log(LOGIT_SCALE))
WEIGHTS = [0.0, 1.0, 0.5, 0.5, 0.13, 0.87]


def test_image_and_text_towers_match_per_sample_models(pair):
    name, store = pair
    vectorized = per_sample_pass(store)
    images = torch.randn(len(WEIGHTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(name)(["a photo of a cat.", "x", "a much longer prompt about a dog", "", "b", "c"])
    weights = torch.tensor(WEIGHTS)[:, None]  # one expert
    with torch.no_grad():
        image_features = vectorized.encode_image(images, weights)
        text_features = vectorized.encode_text(tokens, weights)
        scales = vectorized.logit_scale(weights)
        for i, w in enumerate(WEIGHTS):
            model = oracle(name, store, w)
            expected_image = model.encode_image(images[i : i + 1], normalize=True)[0]
            expected_text = model.encode_text(tokens[i : i + 1], normalize=True)[0]
            torch.testing.assert_close(image_features[i], expected_image, atol=EMBEDDING_ATOL, rtol=0)
            torch.testing.assert_close(text_features[i], expected_text, atol=EMBEDDING_ATOL, rtol=0)
            # exp of the merged log-scale: its absolute error becomes the scale's relative error
            torch.testing.assert_close(scales[i], model.logit_scale.exp(), atol=0, rtol=SCALE_RTOL)


@pytest.mark.parametrize("merged_per_row", [False, True], ids=["outputs-mixed", "weights-merged-per-head"])
def test_heads_for_many_weights_match_per_weight_heads(pair, merged_per_row, monkeypatch):
    name, store = pair
    vectorized = per_sample_pass(store, merged_per_row)
    merged_rows = []  # how many weights each per-row merge was asked for
    merge_rows = row_merge.merge_rows
    monkeypatch.setattr(row_merge, "merge_rows", lambda *a: merged_rows.append(len(a[2])) or merge_rows(*a))
    tokens = open_clip.get_tokenizer(name)([f"{t} {c}" for c in ("cat", "dog", "eel") for t in ("a", "the")])
    weights = torch.tensor([0.0, 0.3, 1.0])
    with torch.no_grad():
        heads = vectorized.zero_shot_heads(tokens, weights[:, None], num_classes=3, chunk=12)  # 2 heads, then 1
    assert set(merged_rows) == ({2, 1} if merged_per_row else set())  # once per head, not once per prompt
    with torch.no_grad():
        for k, w in enumerate(weights.tolist()):
            text = oracle(name, store, w).encode_text(tokens, normalize=True).view(3, 2, -1).mean(1)
            expected = text / text.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(heads[k], expected, atol=EMBEDDING_ATOL, rtol=0)


def test_what_the_pass_cannot_run_is_named():
    resnet = open_clip.create_model("RN50")
    perturbed = open_clip.create_model("RN50")
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.01)
    changed = set(changed_parameters(resnet, perturbed))
    assert "BatchNorm2d, which this pass cannot run per row" in leafwise_reason(resnet, changed)
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        LeafWisePass(resnet, [{n: perturbed.get_parameter(n) for n in changed}])
