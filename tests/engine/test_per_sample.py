"""The per-sample pass on timm and Hugging Face towers (full experts; LoRA experts by their low-rank term) and the LoRA
store, against per-sample merges written out by hand: models loaded from interpolated state_dicts."""

import copy
import json

import open_clip
import pytest
import torch

from helpers import (
    ARCH,
    CLASSNAMES,
    EMBEDDING_ATOL,
    GAMMA,
    LOGITS_ATOL,
    TEMPLATES,
    k_experts_atol,
    make_expert_state_dict,
    rounding_atol,
)
from model_sources import BIOMEDCLIP_DEPTH, BIOMEDCLIP_SIZE, interpolated, variance_preserving, write_peft_adapter
from tcube_lightning.engine import per_sample
from tcube_lightning.engine.leaf_plan import leafwise_reason
from tcube_lightning.engine.per_sample import LeafWisePass, changed_parameters
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.loading import plan_models
from tcube_lightning.merging.coefficients import LambdaMapping
from tcube_lightning.merging.rules import dare, interpolate, slerp, ties
from tcube_lightning.merging.store import ExpertStore

DEEP_EMBEDDING_ATOL = rounding_atol(1.0, depth=BIOMEDCLIP_DEPTH)
"""Unit-norm embeddings through the deeper BiomedCLIP-shaped towers."""
WEIGHTS = [0.0, 1.0, 0.5, 0.13, 0.87, 0.5]


@pytest.fixture(scope="module", params=["test_vit", "test_vit2"])
def timm_pair(request, biomedclip, tmp_path_factory):
    """A BiomedCLIP-shaped generalist and a full expert (seeded noise on every tensor) around a timm ViT:
    ``test_vit`` (token pooling) and ``test_vit2`` (average pooling, LayerScale, fc_norm)."""
    folder = tmp_path_factory.mktemp(request.param)
    config = json.loads((biomedclip["folder"] / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = request.param
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    for name in ("vocab.txt", "tokenizer_config.json"):
        (folder / name).write_text((biomedclip["folder"] / name).read_text())
    torch.manual_seed(0)
    arch = f"local-dir:{folder}"
    pt = variance_preserving(open_clip.create_model(arch, load_weights=False, pretrained_text=False)).eval()
    ft = copy.deepcopy(pt)
    ft.load_state_dict(make_expert_state_dict(pt.state_dict(), scale=0.2))
    return arch, pt, ft


def per_sample_embeddings(model, pt_state, ft_state, images, tokens, weights):
    """Each row through a model loaded from (1 − w)·θ_pt + w·θ_ft for its own w."""
    images_out, text_out = [], []
    for i, w in enumerate(weights):
        model.load_state_dict(interpolated(pt_state, ft_state, w))
        with torch.no_grad():
            images_out.append(model.encode_image(images[i : i + 1], normalize=True)[0])
            text_out.append(model.encode_text(tokens[i : i + 1], normalize=True)[0])
    return torch.stack(images_out), torch.stack(text_out)


def check_pass(vectorized, oracle, pt_state, ft_state, tokenizer, size, atol):
    images = torch.randn(len(WEIGHTS), 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(["a photo of a circle.", "a", "a medical image of a cross.", "", "ring", "square"])
    weights = torch.tensor(WEIGHTS)[:, None]  # one expert
    with torch.no_grad():
        ours = vectorized.encode_image(images, weights), vectorized.encode_text(tokens, weights)
    expected = per_sample_embeddings(oracle, pt_state, ft_state, images, tokens, WEIGHTS)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert (expected[0][0] - expected[0][1]).abs().max() > 1000 * atol  # the two models differ far beyond rounding


def test_timm_and_bert_towers_run_per_sample_exactly(timm_pair):
    arch, pt, ft = timm_pair
    assert leafwise_reason(pt, set(changed_parameters(pt, ft))) is None
    vectorized = LeafWisePass(pt, [changed_parameters(pt, ft)])
    oracle = copy.deepcopy(pt)
    check_pass(
        vectorized,
        oracle,
        pt.state_dict(),
        ft.state_dict(),
        open_clip.get_tokenizer(arch),
        BIOMEDCLIP_SIZE,
        DEEP_EMBEDDING_ATOL,
    )
    assert not [m for m in pt.modules() if "forward" in m.__dict__]  # every leaf given back its own forward


@pytest.mark.parametrize("count", [1, 2])
def test_timm_and_bert_towers_merge_the_weights_of_full_experts_per_row(timm_pair, count):
    """One or two full experts, as the engine gives them (the store's rows stacked): every Linear and the patch
    convolution merge their weights per row (these rows carry enough tokens for either K: 101 image tokens), against
    models loaded per sample from θ_pt + Σ_k w_k·(θ_k − θ_pt) written out by hand."""
    arch, pt, ft = timm_pair
    pt_state, states = pt.state_dict(), [ft.state_dict(), make_expert_state_dict(pt.state_dict(), seed=5, scale=0.2)]
    second = copy.deepcopy(pt)
    second.load_state_dict(states[1])
    states = states[:count]
    store = ExpertStore(copy.deepcopy(pt), [copy.deepcopy(ft), second][:count])
    dense = [store.changed(k) for k in range(count)]
    vectorized = LeafWisePass(store.pretrained, dense, None, {n: store.stacked(n) for n in set().union(*dense)})
    images = torch.randn(len(WEIGHTS), 3, BIOMEDCLIP_SIZE, BIOMEDCLIP_SIZE, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(arch)(["a photo of a circle.", "a", "a cross.", "", "ring", "square"])
    weights = torch.stack([torch.tensor(WEIGHTS), torch.tensor(WEIGHTS).flip(0) / 2], dim=1)[:, :count]
    with torch.no_grad():
        ours = vectorized.encode_image(images, weights), vectorized.encode_text(tokens, weights)
    assert vectorized.row_weights.workspace is not None  # the weights were merged per row
    oracle = copy.deepcopy(pt)
    for i, w in enumerate(weights.tolist()):
        merged = {
            k: pt_state[k] + sum(wk * (sd[k] - pt_state[k]) for wk, sd in zip(w, states))
            if pt_state[k].is_floating_point()
            else pt_state[k]
            for k in pt_state
        }
        oracle.load_state_dict(merged)
        with torch.no_grad():
            expected = oracle.encode_image(images[i : i + 1], True), oracle.encode_text(tokens[i : i + 1], True)
        for got, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(got[i : i + 1], want, atol=k_experts_atol(DEEP_EMBEDDING_ATOL, count), rtol=0)


@pytest.mark.parametrize("adapter", ["peft", "robustmedclip"])
def test_lora_experts_run_per_sample_by_their_low_rank_term(biomedclip, hf_cache, tmp_path, adapter):
    arch = f"local-dir:{biomedclip['folder']}"
    generalist = open_clip.create_model(arch).eval()
    if adapter == "peft":
        peft_model = write_peft_adapter(
            copy.deepcopy(generalist), tmp_path, r=4, lora_alpha=4, target_modules=["qkv", "query", "value"]
        )  # image and text towers
        expert_state, checkpoint = peft_model.merge_and_unload().state_dict(), tmp_path
    else:
        from model_sources import write_robustmedclip

        write_robustmedclip(generalist, tmp_path / "model.pth")
        checkpoint = tmp_path / "model.pth"
    loaded = plan_models(arch, None, str(checkpoint), str(hf_cache)).load()
    if adapter == "robustmedclip":
        expert_state = loaded.expert.expert(loaded.pretrained).state_dict()  # the loader's, checked in test_loading
    store = ExpertStore(loaded.pretrained, [loaded.expert])
    vectorized = LeafWisePass(store.pretrained, [{}], [store.updates(0)])
    check_pass(
        vectorized,
        copy.deepcopy(generalist),
        generalist.state_dict(),
        expert_state,
        open_clip.get_tokenizer(arch),
        BIOMEDCLIP_SIZE,
        DEEP_EMBEDDING_ATOL,
    )


def test_lora_on_open_clip_multihead_attention_runs_per_sample(clip_pair, tmp_path):
    from tcube_lightning.loading import load_clip

    peft_model = write_peft_adapter(
        load_clip(ARCH, clip_pair[0]), tmp_path, r=4, lora_alpha=2, target_modules=["attn", "c_fc"]
    )
    expert_state = copy.deepcopy(peft_model).merge_and_unload().state_dict()  # out_proj counted twice, as peft does
    loaded = plan_models(ARCH, str(clip_pair[0]), str(tmp_path)).load()
    store = ExpertStore(loaded.pretrained, [loaded.expert])
    assert leafwise_reason(store.pretrained, loaded.expert.changed_parameters()) is None
    vectorized = LeafWisePass(store.pretrained, [{}], [store.updates(0)])
    pt_state = torch.load(clip_pair[0], weights_only=True)
    check_pass(
        vectorized,
        load_clip(ARCH, clip_pair[0]),
        pt_state,
        expert_state,
        open_clip.get_tokenizer(ARCH),
        28,
        EMBEDDING_ATOL,
    )


def make_engine(pt, expert, tokens, samplewise="vectorized"):
    engine = TCubeEngine(
        pt,
        expert,
        [tokens],
        [len(CLASSNAMES)],
        LambdaMapping(gamma=GAMMA),
        merge_text=True,
        samplewise=samplewise,
        heads="exact",
    )
    rules = {
        "wise": lambda st: interpolate(st.pt_flat, st.expert_flat(0), 0.3),
        "ties": lambda st: ties(st.pt_flat, st.expert_flats(), 0.2, 1.0),
        "dare": lambda st: dare(st.pt_flat, st.expert_flats(), 0.5, 1.0, 0),
        "slerp": lambda st: slerp(st.pt_flat, st.expert_flat(0), 0.5, st.segments),
    }
    engine.prepare(rules, extremes=False, weight_range=(0.0, 1.0))
    return engine


def test_a_lora_store_gives_the_engine_the_same_models_as_the_materialised_expert(clip_pair, tmp_path):
    """Every method's logits with the adapter (no full expert copy) equal those with the expert materialised."""
    from tcube_lightning.loading import load_clip

    write_peft_adapter(load_clip(ARCH, clip_pair[0]), tmp_path, r=2, lora_alpha=2, target_modules=["c_fc"])
    loaded = plan_models(ARCH, str(clip_pair[0]), str(tmp_path)).load()
    tokens = open_clip.get_tokenizer(ARCH)([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    lora = make_engine(loaded.pretrained, loaded.expert, tokens)
    full = make_engine(load_clip(ARCH, clip_pair[0]), loaded.expert.expert(loaded.pretrained), tokens)
    assert not lora.store.full and full.store.full
    adapter = ("down_", "up_", "replaced_")
    own = sum(  # the store's own buffers besides the adapter's (the models' non-learned buffers are theirs)
        b.numel() for name, b in lora.store.named_buffers() if "." not in name and not name.startswith(adapter)
    )
    assert own == lora.store.num_parameters  # the generalist alone: the targets' values come in the forwards
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    weights = torch.tensor(WEIGHTS)
    a, b = lora.coefficients(images, 0), full.coefficients(images, 0)
    for got, want in ((a.pt_logits, b.pt_logits), (a.ft_logits, b.ft_logits)):
        torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
    for name in ("wise", "ties", "dare", "slerp"):
        torch.testing.assert_close(
            lora.static_logits(images, name), full.static_logits(images, name), atol=LOGITS_ATOL, rtol=0
        )
    torch.testing.assert_close(lora.merged_logits(images, 0.3), full.merged_logits(images, 0.3), atol=0, rtol=0)
    torch.testing.assert_close(
        lora.sample_merged_logits(images, weights), full.sample_merged_logits(images, weights), atol=LOGITS_ATOL, rtol=0
    )
    assert lora.samplewise_summary() == {"path": "vectorized", "pass": "leaf-wise, low-rank (LoRA)"}


def test_a_pass_that_mixes_rows_is_caught_by_the_probe_and_the_loop_serves(timm_pair, monkeypatch):
    arch, pt, ft = timm_pair
    tokens = open_clip.get_tokenizer(arch)([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    original = LeafWisePass.encode_image
    monkeypatch.setattr(per_sample.LeafWisePass, "encode_image", lambda self, x, w: original(self, x, w).roll(1, 0))
    engine = make_engine(copy.deepcopy(pt), copy.deepcopy(ft), tokens, samplewise="auto")
    assert engine.samplewise_summary()["path"] == "loop"
    assert "from per-sample merges on a probe" in engine.samplewise_summary()["reason"]
