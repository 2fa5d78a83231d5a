"""The methods registry and the output/coefficient methods, against NumPy evaluations of their definitions."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from helpers import rounding_atol
from tcube_lightning.errors import InputError
from tcube_lightning.evaluation.options import method_families
from tcube_lightning.merging.methods import (
    METHOD_FAMILIES,
    BaselineSettings,
    BatchContext,
    build_methods,
    confidence_selection,
    output_ensemble,
    with_grid,
)


def context(pt_logits, ft_logits, weights=None, calls=None):
    """A batch context whose model callables record what they were asked for."""
    record = calls if calls is not None else []
    weights = torch.zeros(len(pt_logits), 1) if weights is None else torch.tensor(weights)[:, None]
    return BatchContext(
        torch.arange(len(pt_logits)),
        pt_logits,
        ft_logits[None],  # one expert
        weights,
        lambda images, w: record.append(("merged", w)) or torch.zeros(len(images), 2),
        lambda images, w: record.append(("sample", w.tolist())) or torch.zeros(len(images), 2),
        lambda images, name: record.append(("static", name)) or torch.zeros(len(images), 2),
        weights,
    )


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return 4 * torch.randn(6, 5, generator=g), 4 * torch.randn(6, 5, generator=g)


def test_output_ensemble_is_the_log_of_the_mean_probability(logits):
    a, b = logits
    expected = np.log(0.5 * softmax(a.double().numpy(), -1) + 0.5 * softmax(b.double().numpy(), -1))
    atol = rounding_atol(float(torch.cat(logits).abs().max()))
    np.testing.assert_allclose(output_ensemble(context(a, b)).numpy(), expected, atol=atol, rtol=0)


def test_confidence_selection_takes_the_more_confident_model(logits):
    a, b = logits
    p, q = softmax(a.double().numpy(), -1), softmax(b.double().numpy(), -1)
    expected = np.where((q.max(-1) > p.max(-1))[:, None], b.numpy(), a.numpy())
    assert 0 < (q.max(-1) > p.max(-1)).sum() < len(p)  # both models are chosen somewhere
    np.testing.assert_array_equal(confidence_selection(context(a, b)).numpy(), expected)


def test_t3_merges_per_sample_and_t3_batch_at_the_mean_weight(logits):
    calls, weights = [], [0.1, 0.2, 0.3, 0.9, 0.5, 0.0]
    ctx = context(*logits, weights=weights, calls=calls)
    methods = build_methods()
    methods["t3"].logits(ctx)
    methods["t3_batch"].logits(ctx)
    assert calls[0] == ("sample", [[pytest.approx(w)] for w in weights])
    assert calls[1][0] == "merged" and calls[1][1].tolist() == [pytest.approx(np.mean(weights))]
    # The weights each sample was merged with, as the per-sample table records them.
    np.testing.assert_array_equal(methods["t3"].merge_weights(ctx).numpy(), np.float32(weights)[:, None])
    batch_weights = methods["t3_batch"].merge_weights(ctx).numpy()
    np.testing.assert_allclose(batch_weights, [[np.mean(weights)]] * 6, atol=rounding_atol(1.0), rtol=0)


def test_the_grid_copies_every_method_merging_with_t3_weights_after_it():
    methods = with_grid(build_methods(), ["gamma=4", "gamma=8,lambda_weights=pretrained"])
    names = list(methods)
    t3 = names.index("t3")
    assert names[t3 : t3 + 3] == ["t3", "t3[gamma=4]", "t3[gamma=8,lambda_weights=pretrained]"]
    copies = {n for n in names if "[" in n}
    assert copies == {
        f"{m}[{s}]" for m in ("t3", "t3_batch", "t3_cluster") for s in ("gamma=4", "gamma=8,lambda_weights=pretrained")
    }
    copy = methods["t3_batch[gamma=4]"]
    assert copy.setting == "gamma=4" and copy.family == "t3_batch" and copy.predict is methods["t3_batch"].predict
    assert methods["t3_batch"].setting == ""


def test_registry_kinds_follow_from_what_each_method_defines(logits):
    methods = build_methods()
    assert tuple(dict.fromkeys(m.family for m in methods.values())) == METHOD_FAMILIES
    static = {n for n, m in methods.items() if m.is_static}
    assert static == {"wise_ft@0.5", "slerp", "task_arithmetic", "ties", "dare", "m3", "soup"}
    assert {n for n, m in methods.items() if m.is_clustered} == {"t3_cluster", "dawin_cluster"}
    assert {n for n, m in methods.items() if m.per_sample} == {"t3", "dawin", "maxconf", "xent", "dawin_mtl"}
    assert all(m.reference for m in methods.values())
    calls = []
    ctx = context(*logits, calls=calls)
    assert methods["ties"].logits(ctx) is not None and calls == [("static", "ties")]
    assert methods["t3_cluster"].logits(ctx) is None  # predicts in the second pass
    assert methods["zeroshot"].logits(ctx) is ctx.pt_logits


def test_one_wise_ft_column_per_alpha():
    names = [n for n in build_methods(BaselineSettings(wise_alphas=[0.2, 0.7])) if n.startswith("wise_ft")]
    assert names == ["wise_ft@0.2", "wise_ft@0.7"]


# ------------------------------------------------------------------------------------------------- several experts
@pytest.fixture
def k_logits():
    """The generalist's and three experts' logits (rows × classes; experts × rows × classes)."""
    g = torch.Generator().manual_seed(1)
    return 4 * torch.randn(6, 5, generator=g), 4 * torch.randn(3, 6, 5, generator=g)


def k_context(pt, experts, weights, calls):
    return BatchContext(
        torch.arange(len(pt)),
        pt,
        experts,
        weights,
        lambda images, w: calls.append(("merged", w.tolist())) or torch.zeros(len(images), 2),
        lambda images, w: calls.append(("sample", w.tolist())) or torch.zeros(len(images), 2),
        lambda images, name: calls.append(("static", name)) or torch.zeros(len(images), 2),
        weights,
    )


def test_with_several_experts_the_output_methods_take_all_k_plus_1_models(k_logits):
    pt, experts = k_logits
    probs = [softmax(x.double().numpy(), -1) for x in (pt, *experts)]
    ctx = k_context(pt, experts, torch.zeros(6, 3), [])
    atol = rounding_atol(float(torch.cat([pt, experts.flatten(0, 1)]).abs().max()))
    np.testing.assert_allclose(output_ensemble(ctx).numpy(), np.log(np.mean(probs, axis=0)), atol=atol, rtol=0)
    chosen = np.argmax([p.max(-1) for p in probs], axis=0)
    assert len(set(chosen.tolist())) > 1  # several models are chosen somewhere
    everything = np.stack([x.numpy() for x in (pt, *experts)])
    expected = everything[chosen, np.arange(6)]
    np.testing.assert_array_equal(confidence_selection(ctx).numpy(), expected)


def test_dawin_mtl_routes_0_3_k_by_the_experts_confidence(k_logits):
    """naver-ai/dawin, dawin_mtl: per sample 0.3·K·softmax_k(−H(p_k)) on each task vector."""
    pt, experts = k_logits
    calls = []
    methods = build_methods(experts=["a", "b", "c"])
    methods["dawin_mtl"].logits(k_context(pt, experts, torch.zeros(6, 3), calls))
    entropies = np.stack([-(p * np.log(p)).sum(-1) for p in (softmax(x.double().numpy(), -1) for x in experts)], -1)
    expected = 0.3 * 3 * softmax(-entropies, axis=-1)
    ((kind, weights),) = calls
    assert kind == "sample"
    np.testing.assert_allclose(weights, expected, atol=rounding_atol(4 * 5), rtol=0)


def test_t3_batch_with_several_experts_merges_at_the_mean_weight_vector(k_logits):
    pt, experts = k_logits
    weights = torch.rand(6, 3, generator=torch.Generator().manual_seed(2))
    calls = []
    build_methods(experts=["a", "b", "c"])["t3_batch"].logits(k_context(pt, experts, weights, calls))
    ((kind, merged),) = calls
    assert kind == "merged"
    np.testing.assert_allclose(merged, weights.double().numpy().mean(0), atol=rounding_atol(1.0), rtol=0)


def test_several_experts_bring_one_column_each_and_refuse_the_two_model_methods():
    methods = build_methods(BaselineSettings(), experts=["blood", "retina"])
    assert {"expert:blood", "expert:retina", "soup", "dawin_mtl", "ties", "t3", "t3_batch"} <= set(methods)
    assert not {"expert", "wise_ft@0.5", "slerp", "m3", "dawin", "t3_cluster", "dawin_cluster"} & set(methods)
    assert "scale 0.3" in methods["task_arithmetic"].description  # the task arithmetic paper's s for many
    assert "scale 0.5" in build_methods()["task_arithmetic"].description  # one expert: as before
    assert "scale 0.3" in methods["dare"].description and "scale 1," in build_methods()["dare"].description
    assert "scale 0.7" in build_methods(BaselineSettings(dare_scale=0.7), experts=["a", "b"])["dare"].description
    with pytest.raises(InputError, match=r"\['slerp', 'm3'\] merge the generalist with one expert"):
        method_families(["t3", "slerp", "m3"], experts=2)
    assert "t3_cluster" not in method_families(None, experts=2) and "t3_cluster" in method_families(None)
