"""Methods against independent computations: per-sample merges against per-sample open_clip models."""

import math

import numpy as np
import pytest
import torch
from conftest import ARCH, CLASSNAMES, TEMPLATES
from scipy.special import softmax
from test_merging import oracle_logits

from tcube_lightning.merging import FusedParameterStore
from tcube_lightning.methods import BatchContext, batch_merge, output_ensemble, per_sample_merge
from tcube_lightning.models import clip_logits, load_clip, tokenize_prompts, zero_shot_head
from tcube_lightning.samplewise import SampleWiseCLIP, per_sample_loop

# fp32 logits at scale 100: the loop merges weights (as the oracle does); the vectorized pass mixes
# activations instead, whose rounding differs more (the bound for it: 1e-4).
TOLERANCE = {"loop": 1e-5, "vectorized": 1e-4}


@pytest.fixture(scope="module")
def setting(clip_pair):
    store = FusedParameterStore(load_clip(ARCH, clip_pair[0]), load_clip(ARCH, clip_pair[1]))
    tokens = tokenize_prompts(ARCH, CLASSNAMES, TEMPLATES)

    def merged_logits(images, w):
        model = store.merge(w)
        return clip_logits(model, images, zero_shot_head(model, tokens, len(CLASSNAMES)))

    vectorized = SampleWiseCLIP(store.pretrained, store.expert)
    paths = {
        "loop": lambda images, w: per_sample_loop(merged_logits, images, w),
        "vectorized": lambda images, w: vectorized.logits(images, w, tokens, len(CLASSNAMES)),
    }
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    return merged_logits, paths, pt_sd, ft_sd, images, tokens


def context(images, weights, merged_logits, sample_merged_logits=None):
    logits = torch.zeros(len(images), len(CLASSNAMES))
    return BatchContext(images, logits, logits, torch.tensor(weights), merged_logits, sample_merged_logits, None)


@pytest.mark.parametrize(
    "weights",
    [[0.0, 0.1, 0.5, 0.9, 1.0, 0.37], [0.42] * 6, [0.0, 1.0, 0.0, 1.0, 0.2, 0.2]],
    ids=["distinct", "all-equal", "extremes-and-repeats"],
)
@pytest.mark.parametrize("path", ["loop", "vectorized"])
def test_per_sample_merge_equals_one_open_clip_model_per_sample(setting, weights, path):
    merged_logits, paths, pt_sd, ft_sd, images, tokens = setting
    with torch.no_grad():
        ours = per_sample_merge(context(images, weights, merged_logits, paths[path]))
    for i, w in enumerate(weights):
        expected = oracle_logits(pt_sd, ft_sd, w, images[i : i + 1], tokens)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=TOLERANCE[path], rtol=1e-5)


def test_batch_merge_uses_the_mean_weight_for_every_sample(setting):
    merged_logits, _, pt_sd, ft_sd, images, tokens = setting
    weights = [0.1, 0.2, 0.3, 0.9, 0.5, 0.0]
    with torch.no_grad():
        ours = batch_merge(context(images, weights, merged_logits))
    torch.testing.assert_close(
        ours, oracle_logits(pt_sd, ft_sd, float(np.mean(weights)), images, tokens), atol=1e-5, rtol=1e-5
    )


def test_output_ensemble_is_the_log_of_the_mean_probability():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    ctx = BatchContext(torch.zeros(4), a, b, torch.zeros(4), lambda *_: None, lambda *_: None, None)
    expected = np.log(0.5 * softmax(a.numpy(), -1) + 0.5 * softmax(b.numpy(), -1))
    np.testing.assert_allclose(output_ensemble(ctx).numpy(), expected, rtol=1e-5)
    assert math.isclose(output_ensemble(ctx).exp().sum(-1)[0].item(), 1.0, rel_tol=1e-5)
