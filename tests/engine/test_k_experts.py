"""Several experts (our extension of T³): the store's merge, the exact per-sample pass and the loop, T³-K's
coefficients, against float64 models loaded from per-sample state_dict merges written out by hand, for K = 1, 2 and 4
full and LoRA experts mixed (a LoRA expert's θ_k from peft's own merge)."""

import numpy as np
import open_clip
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import expit, softmax
from scipy.stats import entropy

from helpers import ARCH, CLASSNAMES, GAMMA, JS_ATOL, LOGITS_ATOL, TEMPLATES, k_experts_atol, lambda_atol
from tcube_lightning.engine import row_merge
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import tokenize_prompts
from tcube_lightning.loading import plan_models
from tcube_lightning.merging.coefficients import KExperts, LambdaMapping

TEAMS = {1: ["full_a"], 2: ["full_a", "lora_a"], 4: ["full_a", "lora_a", "full_b", "lora_b"]}
FULL_TEAM = ["full_a", "full_b"]
"""Full experts alone (and one full expert: team 1): their 50-token leaves merge weights per row
(``row_merge.min_tokens``) rather than outputs."""


def float64_logits(pt_sd: dict, expert_sds: list[dict], weights: list[float], images, tokens, text_weights=None):
    """Zero-shot logits of an open_clip model loaded, in float64, from θ_pt + Σ_k w_k·(θ_k − θ_pt); the class
    embeddings from the model merged at ``text_weights`` if given (the generalist's head: all zeros)."""

    def model_at(w):
        merged = {
            key: pt_sd[key].double()
            + sum(wk * (sd[key].double() - pt_sd[key].double()) for wk, sd in zip(w, expert_sds))
            if pt_sd[key].is_floating_point()
            else pt_sd[key]
            for key in pt_sd
        }
        model = open_clip.create_model(ARCH).double().eval()
        model.load_state_dict(merged)
        return model

    model = model_at(weights)
    text_model = model if text_weights is None else model_at(text_weights)
    with torch.no_grad():
        text = text_model.encode_text(tokens, normalize=True).view(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
        head = text / text.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * model.encode_image(images.double(), normalize=True) @ head.T).float()


@pytest.fixture(scope="module")
def setting(clip_pair, expert_team):
    pt_sd = torch.load(clip_pair[0], weights_only=True)
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    return pt_sd, images, tokens


def make_engine(clip_pair, expert_team, team, samplewise="vectorized", merge_text=True, rule="independent"):
    names = TEAMS[team] if isinstance(team, int) else team
    plan = plan_models(ARCH, str(clip_pair[0]), None, experts={n: str(expert_team[n][0]) for n in names})
    loaded = plan.load()
    tokens = tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)
    engine = TCubeEngine(
        loaded.pretrained,
        list(loaded.experts.values()),
        [tokens],
        [len(CLASSNAMES)],
        LambdaMapping(gamma=GAMMA),
        merge_text=merge_text,
        samplewise=samplewise,
        heads="exact",
        k_experts=KExperts(rule),
        expert_names=names,
    )
    engine.prepare({}, extremes=False)
    return engine


def row_weights(count: int) -> torch.Tensor:
    """Six rows of expert weights: seeded, a repeated row, all zeros, and one expert alone at 1."""
    rows = torch.rand(6, count, generator=torch.Generator().manual_seed(count)) / count
    rows[3], rows[4] = rows[2], 0.0
    rows[5] = torch.nn.functional.one_hot(torch.tensor(count - 1), count).float()
    return rows


@pytest.mark.parametrize("samplewise", ["vectorized", "loop"])
@pytest.mark.parametrize("team", [1, 2, 4, "full"])
def test_each_sample_runs_through_its_own_k_expert_merge(
    clip_pair, expert_team, setting, team, samplewise, monkeypatch
):
    pt_sd, images, tokens = setting
    names = FULL_TEAM if team == "full" else TEAMS[team]
    count = len(names)
    # with full experts alone, merged weights of a few rows at a time: the chunks and the shared workspace tested too
    monkeypatch.setattr(row_merge, "WORKSPACE_ELEMENTS", 4 * 64 * 256)
    engine = make_engine(clip_pair, expert_team, names, samplewise)
    assert engine.samplewise_summary()["path"] == samplewise
    expert_sds = [expert_team[n][1] for n in names]
    weights = row_weights(count)
    ours = engine.sample_merged_logits(images, weights)
    if samplewise == "vectorized":  # which mix ran: the weights' per row only with full experts alone
        assert (engine.vectorized_logits.__self__.row_weights.workspace is not None) == (team in (1, "full"))
    for i, w in enumerate(weights.tolist()):
        expected = float64_logits(pt_sd, expert_sds, w, images[i : i + 1], tokens)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=k_experts_atol(LOGITS_ATOL, count), rtol=0)
    # one merged model for the whole batch, at a weight vector of its own
    expected = float64_logits(pt_sd, expert_sds, weights[0].tolist(), images, tokens)
    merged = engine.merged_logits(images, weights[0])
    torch.testing.assert_close(merged, expected, atol=k_experts_atol(LOGITS_ATOL, count), rtol=0)


def test_without_merged_text_towers_every_merge_keeps_the_generalists_head(clip_pair, expert_team, setting):
    pt_sd, images, tokens = setting
    engine = make_engine(clip_pair, expert_team, 4, merge_text=False)
    expert_sds = [expert_team[n][1] for n in TEAMS[4]]
    weights = row_weights(4)
    ours = engine.sample_merged_logits(images, weights)
    for i, w in enumerate(weights.tolist()):
        expected = float64_logits(pt_sd, expert_sds, w, images[i : i + 1], tokens, text_weights=[0.0] * 4)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=k_experts_atol(LOGITS_ATOL, 4), rtol=0)


def test_lora_experts_stay_low_rank_in_the_store(clip_pair, expert_team):
    engine = make_engine(clip_pair, expert_team, 4)
    store = engine.store
    sizes = {name: b.numel() for name, b in store.named_buffers() if "." not in name}  # the store's own
    assert sizes["full_flats"] == 2 * store.num_parameters  # the two full experts
    adapters = sum(n for name, n in sizes.items() if name.startswith(("down_", "up_", "replaced_")))
    assert set(sizes) - {"pt_flat", "merged_flat", "full_flats"} == {
        name for name in sizes if name.startswith(("down_", "up_", "replaced_"))
    }
    assert 0 < adapters < 0.1 * store.num_parameters  # a LoRA expert is its adapter alone


def test_lora_experts_alone_keep_one_model_and_their_adapters(clip_pair, expert_team, setting):
    """The working model's values of the LoRA targets are computed in the forwards that read them (the oracles above
    check the values): nothing but the generalist and the adapters is kept, and after a forward, even one that
    failed, the working model holds its own parameters again."""
    _, images, _ = setting
    store = make_engine(clip_pair, expert_team, ["lora_a", "lora_b"]).store
    sizes = {name: b.numel() for name, b in store.named_buffers() if "." not in name}
    adapters = {name for name in sizes if name.startswith(("down_", "up_", "replaced_"))}
    assert set(sizes) - adapters == {"pt_flat", "merged_flat", "full_flats"}
    assert sizes["pt_flat"] == store.num_parameters and sizes["merged_flat"] == sizes["full_flats"] == 0
    own = {n: p.data_ptr() for n, p in store.working.named_parameters()}
    model = store.merge([0.3, 0.6])
    model.encode_image(images)
    target = next(u.parameter for u in store.updates(0) if u.parameter.startswith("visual."))
    attention = model.get_submodule(target.rpartition(".")[0])
    seen = []

    def failing(*args, **kwargs):
        seen.append(getattr(attention, target.rpartition(".")[2]).data_ptr())
        raise RuntimeError("a forward that fails")

    attention.forward = failing
    with pytest.raises(RuntimeError, match="a forward that fails"):
        model.encode_image(images)
    del attention.forward
    assert seen and seen[0] != own[target]  # the merged values were in place during the forward
    assert {n: p.data_ptr() for n, p in store.working.named_parameters()} == own


@pytest.mark.parametrize("rule", ["independent", "routed"])
def test_t3_k_coefficients_from_each_experts_disagreement(clip_pair, expert_team, setting, rule):
    """JS_k against scipy, λ_k through T³'s mapping, w_k by the rule written out in NumPy, and the generalised JS of
    all K + 1 distributions, H(mean p) − mean H(p), against scipy's entropies."""
    pt_sd, images, tokens = setting
    engine = make_engine(clip_pair, expert_team, 4, rule=rule)
    batch = engine.coefficients(images, 0)
    expert_sds = [expert_team[n][1] for n in TEAMS[4]]
    pt = float64_logits(pt_sd, expert_sds, [0.0] * 4, images, tokens).double().numpy()
    experts = [
        float64_logits(pt_sd, expert_sds, np.eye(4)[k].tolist(), images, tokens).double().numpy() for k in range(4)
    ]
    p_pt, p_k = softmax(pt, -1), [softmax(x, -1) for x in experts]
    js = np.stack([jensenshannon(p_pt, p, axis=-1) ** 2 for p in p_k], axis=-1)
    np.testing.assert_allclose(batch.js.numpy(), js, atol=JS_ATOL, rtol=0)
    lam = expit(GAMMA * js)
    np.testing.assert_allclose(batch.lambdas[""].numpy(), lam, atol=lambda_atol(GAMMA), rtol=0)
    if rule == "independent":
        expected = lam / 4
    else:
        confidence = -np.stack([entropy(p, axis=-1) for p in p_k], axis=-1)
        expected = lam * softmax(confidence, axis=-1)
    np.testing.assert_allclose(batch.weights[""].numpy(), expected, atol=lambda_atol(GAMMA) + JS_ATOL, rtol=0)
    every = [p_pt, *p_k]
    generalised = entropy(np.mean(every, axis=0), axis=-1) - np.mean([entropy(p, axis=-1) for p in every], axis=0)
    np.testing.assert_allclose(batch.generalised_js.numpy(), generalised, atol=JS_ATOL, rtol=0)
    assert np.ptp(batch.weights[""].numpy(), axis=0).max() > 0.01  # the weights really differ per sample


@pytest.mark.parametrize("rule", ["independent", "routed"])
def test_with_one_expert_both_rules_are_t3_itself(clip_pair, expert_team, setting, rule):
    _, images, _ = setting
    plain = make_engine(clip_pair, expert_team, 1).coefficients(images, 0)
    ruled = make_engine(clip_pair, expert_team, 1, rule=rule).coefficients(images, 0)
    torch.testing.assert_close(ruled.weights[""], plain.weights[""], atol=0, rtol=0)
    torch.testing.assert_close(plain.weights[""], plain.lambdas[""], atol=0, rtol=0)  # λ weights the expert
    assert plain.generalised_js is None


@pytest.mark.parametrize("team", [2, 3, 4])
def test_interpolated_heads_of_several_experts_match_direct_text_passes(clip_pair, expert_team, setting, team):
    """With merge_text, the merged head h(w) of a weight vector from the tensor-product grid over the box the run's
    weights take, against direct text passes at seeded weight vectors in it (within the head tolerance)."""
    _, images, _ = setting
    names = TEAMS[team] if team != 3 else TEAMS[4][:3]
    engines = {}
    for heads in ("interpolated", "exact"):
        plan = plan_models(ARCH, str(clip_pair[0]), None, experts={n: str(expert_team[n][0]) for n in names})
        loaded = plan.load()
        engines[heads] = TCubeEngine(
            loaded.pretrained,
            list(loaded.experts.values()),
            [tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)],
            [len(CLASSNAMES)],
            LambdaMapping(gamma=GAMMA),
            merge_text=True,
            heads=heads,
            head_tolerance=1e-4,
            expert_names=names,
        )
        engines[heads].prepare({}, extremes=False, weight_range=(0.1, 0.2))
    (summary,) = engines["interpolated"].head_summary["class_sets"]
    assert summary["experts"] == len(names) and summary["nodes"] is not None  # a grid qualified
    weights = 0.1 + 0.1 * torch.rand(6, len(names), generator=torch.Generator().manual_seed(team))
    interpolated = engines["interpolated"].sample_merged_logits(images, weights)
    exact = engines["exact"].sample_merged_logits(images, weights)
    torch.testing.assert_close(interpolated, exact, atol=1e-4 + LOGITS_ATOL, rtol=0)


def test_successive_passes_each_merge_at_their_own_weights(clip_pair, expert_team, setting):
    # the pass keeps each batch's per-row weights while it runs (leaves, then the logit scale): none may outlive it
    pt_sd, images, tokens = setting
    engine = make_engine(clip_pair, expert_team, ["full_a"])
    expert_sds = [expert_team["full_a"][1]]
    assert not torch.equal(expert_sds[0]["logit_scale"], pt_sd["logit_scale"])  # merged per row, as every leaf
    for seed in (1, 2):
        weights = torch.rand(3, 1, generator=torch.Generator().manual_seed(seed))
        ours = engine.sample_merged_logits(images[:3], weights)
        for i, w in enumerate(weights.tolist()):
            expected = float64_logits(pt_sd, expert_sds, w, images[i : i + 1], tokens)
            torch.testing.assert_close(ours[i : i + 1], expected, atol=LOGITS_ATOL, rtol=0)
