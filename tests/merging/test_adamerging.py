"""AdaMerging against a reference written with plain open_clip and torch (explicit per-tensor interpolation, the
same seed and batches), its first step against the gradient measured by finite differences, clamping, and the
command line's records."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import (
    ARCH,
    CLASSNAMES,
    FRACTION_ATOL,
    TEMPLATES,
    cli_args,
    make_expert_state_dict,
    run_cli_expecting_error,
    run_cli_in_process,
)
from model_sources import split_images
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.adamerging import AdaMergingSettings, adapt, batches, merged_flat
from tcube_lightning.merging.store import ExpertStore

STEPS, BATCH = 6, 8
COEFFICIENT_ATOL = 1e-5
"""λ after a few Adam steps: each moves it by lr·m̂/(√v̂ + ε), whose rounding (float32, on gradients of the
magnitude of an entropy) stays orders of magnitude below this."""


@pytest.fixture(scope="module")
def setting(clip_pair, npz_root):
    """The tiny pair's state_dicts, split a's images as the run preprocesses them, the pretrained zero-shot head."""
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    images, labels = split_images(npz_root / "tiny_a.npz", 28)
    model = open_clip.create_model(ARCH).eval()
    model.load_state_dict(pt_sd)
    tokens = open_clip.get_tokenizer(ARCH)([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
    return pt_sd, ft_sd, images, labels, F.normalize(text, dim=-1)


def reference(pt_sd, ft_sds, images, head, layer_wise, steps, lr, init=0.3, clamp=True, seed=0):
    """AdaMerging as its paper describes it: λ per expert (one, or one per image-tower tensor),
    θ = θ_pt + Σ_k λ_k·(θ_k − θ_pt) written out per tensor, Adam on the mean entropy of the zero-shot softmax; batches
    in the order ``adamerging.batches`` documents (epoch e: randperm seeded seed + e)."""
    model = open_clip.create_model(ARCH).eval()
    model.load_state_dict(pt_sd)
    names = [n for n, _ in model.named_parameters() if n.startswith("visual.")]
    lam = torch.full((len(ft_sds), len(names) if layer_wise else 1), init, requires_grad=True)
    optimiser = torch.optim.Adam([lam], lr=lr)
    epochs = [torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + e)) for e in range(3)]
    flat_batches = [batch for order in epochs for batch in order.split(BATCH)]
    for step in range(steps):
        merged = {
            n.removeprefix("visual."): pt_sd[n]
            + sum(lam[k, i % lam.shape[1]] * (ft_sd[n] - pt_sd[n]) for k, ft_sd in enumerate(ft_sds))
            for i, n in enumerate(names)
        }
        features = torch.func.functional_call(model.visual, merged, (images[flat_batches[step]],))
        logits = pt_sd["logit_scale"].exp() * F.normalize(features, dim=-1) @ head.T
        p = logits.softmax(-1)
        entropy = -(p * p.log()).sum(-1).mean()
        optimiser.zero_grad()
        entropy.backward()
        optimiser.step()
        if clamp:
            with torch.no_grad():
                lam.clamp_(0, 1)
    return lam.detach()


def ours(clip_pair, images, labels, head, layer_wise, settings, more_experts=()):
    """The product's adaptation on the preprocessed images (as the data module gives them: image, label), with the
    tiny expert and ``more_experts`` (state_dicts)."""
    experts = [load_clip(ARCH, clip_pair[1])]
    for state in more_experts:
        experts.append(load_clip(ARCH, clip_pair[0]))
        experts[-1].load_state_dict(state)
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), experts)
    dataset = [{"image": image, "label": label} for image, label in zip(images, labels.tolist())]
    result = adapt(
        store.pretrained,
        [store.expert_parameters(k) for k in range(store.count)],
        head,
        batches(dataset, settings.batch_size, settings.seed),
        layer_wise,
        settings,
    )
    return store, result


@pytest.mark.parametrize("experts", [1, 2], ids=["one-expert", "two-experts"])
@pytest.mark.parametrize("layer_wise", [False, True], ids=["task-wise", "layer-wise"])
def test_adapted_coefficients_and_accuracy_match_the_reference(clip_pair, setting, layer_wise, experts):
    pt_sd, ft_sd, images, labels, head = setting
    more = [make_expert_state_dict(pt_sd, seed=5 + k) for k in range(experts - 1)]
    settings = AdaMergingSettings(steps=STEPS, lr=0.05, batch_size=BATCH)
    store, result = ours(clip_pair, images, labels, head, layer_wise, settings, more)
    expected = reference(pt_sd, [ft_sd, *more], images, head, layer_wise, STEPS, lr=0.05)
    torch.testing.assert_close(result.coefficients, expected, atol=COEFFICIENT_ATOL, rtol=0)
    assert len(result.entropy) == STEPS and (expected.shape[1] > 1) == layer_wise and len(expected) == experts
    # The merged model the run evaluates: the store loaded with it, against explicit interpolation at λ.
    model = store.load(merged_flat(store, result))
    oracle = open_clip.create_model(ARCH).eval()
    names = [n for n in pt_sd if n.startswith("visual.") and n in dict(oracle.named_parameters())]
    merged = {
        n: pt_sd[n]
        + sum(expected[k, i % expected.shape[1]] * (ft[n] - pt_sd[n]) for k, ft in enumerate([ft_sd, *more]))
        for i, n in enumerate(names)
    }
    oracle.load_state_dict({**pt_sd, **merged})
    with torch.no_grad():
        ours_pred = (F.normalize(model.encode_image(images), dim=-1) @ head.T).argmax(-1)
        their_pred = (F.normalize(oracle.encode_image(images), dim=-1) @ head.T).argmax(-1)
    assert (ours_pred == torch.as_tensor(labels)).float().mean() == pytest.approx(
        float((their_pred == torch.as_tensor(labels)).float().mean()), abs=FRACTION_ATOL
    )


def test_one_task_wise_step_from_0_3_moves_against_the_measured_gradient(clip_pair, setting):
    """Adam's first step is lr·g/(|g| + ε): λ = 0.3 − lr·sign(g), g the entropy's slope in λ on the first batch,
    here measured by central differences of the reference's entropy (no autograd involved)."""
    pt_sd, ft_sd, images, labels, head = setting
    lr, h = 0.01, 1e-3
    _, result = ours(clip_pair, images, labels, head, False, AdaMergingSettings(steps=1, lr=lr, batch_size=BATCH))
    first = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:BATCH]]
    model = open_clip.create_model(ARCH).eval()

    def entropy_at(lam):
        model.load_state_dict(
            {
                k: pt_sd[k] + lam * (ft_sd[k] - pt_sd[k])
                if k.startswith("visual.") and pt_sd[k].is_floating_point()
                else pt_sd[k]
                for k in pt_sd
            }
        )
        with torch.no_grad():
            p = (pt_sd["logit_scale"].exp() * F.normalize(model.encode_image(first), dim=-1) @ head.T).softmax(-1)
        return float(-(p * p.log()).sum(-1).mean())

    slope = (entropy_at(0.3 + h) - entropy_at(0.3 - h)) / (2 * h)
    assert abs(slope) > 1e-3  # a clear direction
    assert float(result.coefficients[0, 0]) == pytest.approx(0.3 - lr * math.copysign(1, slope), abs=1e-6)


def test_clamping_keeps_the_coefficients_in_0_1(clip_pair, setting):
    _, _, images, labels, head = setting
    for clamp in (True, False):
        settings = AdaMergingSettings(steps=3, lr=1.0, batch_size=BATCH, clamp=clamp)
        _, result = ours(clip_pair, images, labels, head, True, settings)
        inside = bool(((result.coefficients >= 0) & (result.coefficients <= 1)).all())
        assert inside if clamp else not inside  # a learning rate of 1 leaves [0, 1] at once without the clamp


def test_the_command_line_records_what_was_learnt(clip_pair, npz_root, tmp_path, capsys):
    extra = (
        "--model.methods=[zeroshot, adamerging_task, adamerging_layer]",
        "--model.adamerging.steps=3",
        "--model.adamerging.batch_size=8",
        "--data.batch_size=8",
    )
    results, folder = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    for split in ("a", "b"):
        task, layer = (results["adaptation"][split][m] for m in ("adamerging_task", "adamerging_layer"))
        assert isinstance(task["coefficients"], float) and len(task["entropy"]) == 3
        assert len(layer["coefficients"]) == sum(1 for n in torch.load(clip_pair[0]) if n.startswith("visual."))
    assert "## AdaMerging" in (folder / "results.md").read_text()
    assert {"adamerging_task", "adamerging_layer"} <= set((folder / "cost.json").read_text().split('"'))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    groups = sorted({tag.split("/")[0] for tag in events.Tags()["scalars"]})  # TensorBoard's order of groups
    assert groups[0] == "lambda" and len(events.Scalars("steps_adamerging/a_adamerging_task_entropy")) == 3
    once = (*extra, "--model.adamerging.adapt_on=b")  # learnt on split b, used for both
    shared, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "once", *once))
    assert shared["adaptation"]["a"] == shared["adaptation"]["b"] == results["adaptation"]["b"]
    bad = cli_args(clip_pair, npz_root, tmp_path / "bad", *extra, "--model.adamerging.adapt_on=c")
    assert "model.adamerging.adapt_on: 'c' is not a split of this run" in run_cli_expecting_error(bad, capsys)
    steps = cli_args(clip_pair, npz_root, tmp_path / "bad", *extra, "--model.adamerging.steps=0")
    assert "model.adamerging: steps must be >= 1, got 0" in run_cli_expecting_error(steps, capsys)


def test_the_adaptation_runs_on_the_threads_asked_for_and_gives_them_back(clip_pair, npz_root, tmp_path, monkeypatch):
    from tcube_lightning.evaluation import adaptation

    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    original = adaptation.adapt
    monkeypatch.setattr(adaptation, "adapt", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extra = ("--model.methods=[adamerging_task]", "--model.adamerging.steps=1", "--model.adamerging.threads=1")
        run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
        assert seen == [1, 1] and torch.get_num_threads() == 2  # splits a and b on one thread; the run's given back
    finally:
        torch.set_num_threads(before)
