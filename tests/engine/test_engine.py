"""The torch engine without a Trainer, against open_clip models built from explicitly interpolated state_dicts."""

import numpy as np
import open_clip
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import expit, softmax

from helpers import (
    ARCH,
    CLASSNAMES,
    GAMMA,
    JS_ATOL,
    LOGITS_ATOL,
    ONE_FULL_EXPERT,
    TEMPLATES,
    lambda_atol,
    oracle_logits,
    oracle_model,
)
from tcube_lightning.engine import torch_engine as engine_module
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import tokenize_prompts
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.coefficients import LambdaMapping
from tcube_lightning.merging.rules import interpolate

STATIC = {"wise": lambda store: interpolate(store.pt_flat, store.expert_flat(0), 0.3)}


def make_engine(clip_pair, samplewise="loop", merge_text=True, extremes=True, heads="exact"):
    engine = TCubeEngine(
        load_clip(ARCH, clip_pair[0]),
        load_clip(ARCH, clip_pair[1]),
        [tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)],
        [len(CLASSNAMES)],
        LambdaMapping(gamma=GAMMA),
        GRID,
        merge_text=merge_text,
        samplewise=samplewise,
        heads=heads,
        head_tolerance=HEAD_TOLERANCE,
    )
    engine.prepare(STATIC, extremes=extremes, weight_range=(0.0, 1.0))
    return engine


HEAD_TOLERANCE = 1e-4
GRID = {"gamma=4,lambda_weights=pretrained": LambdaMapping(gamma=4.0, lambda_weights="pretrained")}


@pytest.fixture(scope="module")
def setting(clip_pair):
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    return pt_sd, ft_sd, images, tokenize_prompts(open_clip.get_tokenizer(ARCH), CLASSNAMES, TEMPLATES)


@pytest.fixture(scope="module", params=["loop", "vectorized"])
def engine(request, clip_pair):
    return make_engine(clip_pair, samplewise=request.param)


def test_coefficients_from_the_two_models(engine, setting):
    pt_sd, ft_sd, images, tokens = setting
    batch = engine.coefficients(images, 0)
    pt, ft = (oracle_logits(pt_sd, ft_sd, w, images, tokens) for w in (0.0, 1.0))
    torch.testing.assert_close(batch.pt_logits, pt, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(batch.ft_logits, ft[None], atol=LOGITS_ATOL, rtol=0)  # one expert
    js = jensenshannon(softmax(pt.double().numpy(), -1), softmax(ft.double().numpy(), -1), axis=-1) ** 2
    np.testing.assert_allclose(batch.js[:, 0].numpy(), js, atol=JS_ATOL, rtol=0)
    lam = expit(GAMMA * js)  # λ_min 0, λ_max 1
    assert lam.max() - lam.min() > 0.05  # the pair disagrees enough for sample-wise merging to matter
    np.testing.assert_allclose(batch.lambdas[""][:, 0].numpy(), lam, atol=lambda_atol(GAMMA), rtol=0)
    np.testing.assert_array_equal(batch.weights[""].numpy(), batch.lambdas[""].numpy())  # λ weights the expert
    # A grid setting from the same JS: γ = 4, λ weighting the generalist (w = 1 − λ).
    (label,) = GRID
    np.testing.assert_allclose(batch.lambdas[label][:, 0].numpy(), expit(4.0 * js), atol=lambda_atol(4.0), rtol=0)
    np.testing.assert_allclose(batch.weights[label][:, 0].numpy(), 1 - expit(4.0 * js), atol=lambda_atol(4.0), rtol=0)
    assert batch.finite.all()


@pytest.mark.parametrize(
    "weights",
    [[0.0, 0.1, 0.5, 0.9, 1.0, 0.37], [0.42] * 6, [0.0, 1.0, 0.0, 1.0, 0.2, 0.2]],
    ids=["distinct", "all-equal", "extremes-and-repeats"],
)
def test_each_sample_runs_through_its_own_merged_model(engine, setting, weights):
    pt_sd, ft_sd, images, tokens = setting
    ours = engine.sample_merged_logits(images, torch.tensor(weights), 0)
    for i, w in enumerate(weights):
        expected = oracle_logits(pt_sd, ft_sd, w, images[i : i + 1], tokens)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=LOGITS_ATOL, rtol=0)


def test_one_merged_model_for_the_batch(engine, setting):
    pt_sd, ft_sd, images, tokens = setting
    expected = oracle_logits(pt_sd, ft_sd, 0.3333, images, tokens)
    torch.testing.assert_close(engine.merged_logits(images, 0.3333, 0), expected, atol=LOGITS_ATOL, rtol=0)


def test_static_merges_are_built_once_with_their_own_heads(engine, setting):
    pt_sd, ft_sd, images, tokens = setting
    expected = oracle_logits(pt_sd, ft_sd, 0.3, images, tokens)
    torch.testing.assert_close(engine.static_logits(images, "wise", 0), expected, atol=LOGITS_ATOL, rtol=0)


def test_models_at_the_lambda_extremes(engine, setting):
    pt_sd, ft_sd, images, tokens = setting
    low, high = engine.extreme_predictions(images, 0)
    # λ_min = 0 and λ_max = 1 weight the expert (the default): expert weights 0 and 1.
    assert engine.extreme_weights == [0.0, 1.0]
    assert low.tolist() == oracle_logits(pt_sd, ft_sd, 0.0, images, tokens).argmax(-1).tolist()
    assert high.tolist() == oracle_logits(pt_sd, ft_sd, 1.0, images, tokens).argmax(-1).tolist()


def test_without_merge_text_every_merged_model_keeps_the_pretrained_head(clip_pair, setting):
    pt_sd, ft_sd, images, tokens = setting
    fixed = make_engine(clip_pair, merge_text=False, extremes=False)
    pretrained_text = oracle_model(pt_sd, ft_sd, 0.0)
    for weight in (0.25, 0.8):
        expected = oracle_logits(pt_sd, ft_sd, weight, images, tokens, text_model=pretrained_text)
        torch.testing.assert_close(fixed.merged_logits(images, weight, 0), expected, atol=LOGITS_ATOL, rtol=0)
    assert fixed.extreme_predictions(images, 0) is None


def test_no_head_is_computed_twice(clip_pair, setting, monkeypatch):
    calls = []
    original = engine_module.zero_shot_head
    monkeypatch.setattr(engine_module, "zero_shot_head", lambda *args: calls.append(1) or original(*args))
    engine = make_engine(clip_pair, extremes=True)
    # pretrained, expert, one static merge and the two λ extremes: one text pass each, in prepare
    assert len(calls) == 5
    images = setting[2]
    engine.extreme_predictions(images, 0)
    engine.static_logits(images, "wise", 0)
    assert len(calls) == 5
    engine.merged_logits(images, 0.5, 0)  # a new weight needs its own merged text tower
    assert len(calls) == 6


@pytest.mark.parametrize("samplewise", ["loop", "vectorized"])
def test_interpolated_heads_serve_every_sample_without_text_passes(clip_pair, setting, monkeypatch, samplewise):
    pt_sd, ft_sd, images, tokens = setting
    calls = []
    original = engine_module.zero_shot_head
    monkeypatch.setattr(engine_module, "zero_shot_head", lambda *args: calls.append(1) or original(*args))
    engine = make_engine(clip_pair, samplewise=samplewise, extremes=False, heads="interpolated")
    (summary,) = engine.head_summary["class_sets"]
    assert summary["max_logit_deviation"] <= HEAD_TOLERANCE and summary["nodes"] in (5, 9, 17, 33)
    # pretrained, expert, the static merge, then the fit's node heads: one text pass each on the loop, all in one
    # batched per-sample text pass where the vectorized pass runs
    assert len(calls) == 3 + (summary["text_passes"] if samplewise == "loop" else 0)
    weights = [0.0, 0.1, 0.5, 0.9, 1.0, 0.37]
    before = len(calls)
    ours = engine.sample_merged_logits(images, torch.tensor(weights), 0)
    assert len(calls) == before  # no text pass per sample
    for i, w in enumerate(weights):
        expected = oracle_logits(pt_sd, ft_sd, w, images[i : i + 1], tokens)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=LOGITS_ATOL + HEAD_TOLERANCE, rtol=0)
        assert ours[i].argmax() == expected[0].argmax()


def test_auto_takes_the_exact_pass_unless_exact_heads_on_cpu_by_a_rule_not_a_timing(clip_pair):
    """The same input always takes the same path: results never depend on how loaded the machine was."""
    auto = make_engine(clip_pair, samplewise="auto", extremes=False, heads="interpolated")
    assert auto.samplewise_summary() == {"path": "vectorized", "pass": ONE_FULL_EXPERT}
    exact = make_engine(clip_pair, samplewise="auto", extremes=False, heads="exact")
    assert exact.samplewise_summary() == {"path": "loop", "reason": "exact heads on CPU"}
