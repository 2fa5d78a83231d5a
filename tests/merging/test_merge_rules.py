"""Static merge rules on the flat buffers against state_dict arithmetic and the published definitions written out in
plain torch/NumPy, with one task vector and with several."""

import numpy as np
import pytest
import torch

from helpers import ARCH, sum_atol
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.rules import (
    add_task_vectors,
    dare,
    model_soup,
    slerp,
    stacked_task_vectors,
    task_arithmetic,
    ties,
)
from tcube_lightning.merging.store import ExpertStore


@pytest.fixture(scope="module")
def setting(clip_pair):
    store = ExpertStore(load_clip(ARCH, clip_pair[0]), [load_clip(ARCH, clip_pair[1])])
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    return store, {n: pt_sd[n] for n in store.names}, {n: ft_sd[n] for n in store.names}


def unflatten(store, flat):
    return {name: flat[o : o + n] for name, (o, n) in zip(store.names, store.segments)}


def test_segments_cover_every_parameter_in_order(setting):
    store, pt_sd, _ = setting
    pieces = unflatten(store, store.pt_flat)
    for name, value in pt_sd.items():
        torch.testing.assert_close(pieces[name], value.reshape(-1), atol=0, rtol=0)
    assert sum(n for _, n in store.segments) == store.num_parameters


def test_ties_keeps_the_largest_task_vector_entries(setting):
    store, pt_sd, ft_sd = setting
    merged = unflatten(store, ties(store.pt_flat, [store.expert_flat(0)], density=0.2, scale=0.8))
    deltas = {k: ft_sd[k] - pt_sd[k] for k in pt_sd}
    magnitudes = np.concatenate([d.abs().reshape(-1).numpy() for d in deltas.values()])
    cutoff = np.sort(magnitudes)[::-1][round(0.2 * magnitudes.size) - 1]
    kept = 0
    for name in pt_sd:
        mask = deltas[name].abs() >= cutoff
        kept += int(mask.sum())
        expected = pt_sd[name] + 0.8 * torch.where(mask, deltas[name], torch.zeros_like(deltas[name]))
        torch.testing.assert_close(merged[name], expected.reshape(-1))
    assert kept == pytest.approx(0.2 * magnitudes.size, rel=1e-3)


def test_dare_drops_and_rescales_deterministically(setting):
    store, _, _ = setting
    pt, ft = store.pt_flat, store.expert_flat(0)
    merged = dare(pt, [ft], drop=0.3, scale=1.0, seed=7)
    rescaled = pt + (ft - pt) / 0.7
    dropped = torch.isclose(merged, pt, atol=0, rtol=0)
    kept = torch.isclose(merged, rescaled, atol=1e-6, rtol=1e-6)
    assert bool((dropped | kept).all())
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(dare(pt, [ft], drop=0.3, scale=1.0, seed=7), merged, atol=0, rtol=0)
    assert not torch.equal(dare(pt, [ft], drop=0.3, scale=1.0, seed=8), merged)


def test_slerp_per_tensor_matches_the_formula(setting):
    store, pt_sd, ft_sd = setting
    merged = unflatten(store, slerp(store.pt_flat, store.expert_flat(0), 0.35, store.segments))
    for name in pt_sd:
        a, b = pt_sd[name].reshape(-1).double().numpy(), ft_sd[name].reshape(-1).double().numpy()
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        omega = np.arccos(np.clip(a @ b / norms, -1, 1)) if norms > 1e-6 else 0.0
        if omega < 1e-6:  # parallel, or a zero tensor (freshly initialised biases): linear
            expected = 0.65 * a + 0.35 * b
        else:
            expected = (np.sin(0.65 * omega) * a + np.sin(0.35 * omega) * b) / np.sin(omega)
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    a = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0])
    b = torch.tensor([2.0, 4.0, 6.0, 0.0, 0.0])  # first tensor parallel, second all zeros
    out = slerp(a, b, 0.25, [(0, 3), (3, 2)])
    torch.testing.assert_close(out, torch.lerp(a, b, 0.25))


# ----------------------------------------------------------------------------------------------- K task vectors
@pytest.fixture(scope="module")
def vectors():
    """A generalist and four experts as flat vectors on a grid of 2⁻¹² (every sum and difference exact in float32),
    each task vector's magnitudes distinct (trimming is unambiguous), with entries where two experts' signs cancel
    exactly (+a and −a: TIES's tie) and entries some experts leave as they are."""
    g = torch.Generator().manual_seed(0)
    grid = 2.0**-12
    pt = torch.randint(-4096, 4096, (2000,), generator=g) * grid
    taus = []
    for _ in range(4):
        signs = torch.randint(0, 2, (2000,), generator=g) * 2 - 1
        taus.append(signs * (torch.randperm(2000, generator=g) + 1) * grid)
    taus[1] = taus[0].clone()
    taus[1][:20] *= -1
    taus[1][20:] = taus[1][20:][torch.randperm(1980, generator=g)]
    taus[2][:20] = taus[3][:20] = 0.0
    taus[3][20:60] = 0.0
    return pt.float(), [(pt + tau).float() for tau in taus]


def ties_reference(pt: np.ndarray, experts: list[np.ndarray], density: float, scale: float) -> np.ndarray:
    """TIES-Merging as its paper (Yadav et al., NeurIPS 2023, Algorithm 1) states it, in NumPy: trim each task vector
    to its top-k% magnitudes, elect each entry's sign as that of the summed trimmed values (a zero sum: the majority
    of the elected signs, as its code resolves it), the disjoint mean of the entries agreeing with it, then scale."""
    trimmed = []
    for theta in experts:
        tau = theta - pt
        keep = round(density * tau.size)
        order = np.argsort(-np.abs(tau), kind="stable")
        kept = np.zeros_like(tau)
        kept[order[:keep]] = tau[order[:keep]]
        trimmed.append(kept)
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    mean = np.where(count > 0, (stacked * agree).sum(0) / np.maximum(count, 1), 0.0)
    return pt + scale * mean


def test_ties_elects_signs_and_takes_the_disjoint_mean(vectors):
    pt, experts = vectors
    ours = ties(pt, experts, density=0.3, scale=0.9)
    expected = ties_reference(pt.double().numpy(), [e.double().numpy() for e in experts], 0.3, 0.9)
    np.testing.assert_allclose(ours.double().numpy(), expected, atol=sum_atol(pt, 4), rtol=0)
    trimmed = [np.abs(e.numpy() - pt.numpy()) >= np.sort(np.abs(e.numpy() - pt.numpy()))[-600] for e in experts[:2]]
    assert (trimmed[0] & trimmed[1])[:20].any()  # some exact ties reach the election


def test_task_arithmetic_and_the_soup_sum_the_task_vectors(vectors):
    pt, experts = vectors
    p, e = pt.double().numpy(), [x.double().numpy() for x in experts]
    expected = p + 0.3 * sum(x - p for x in e)
    np.testing.assert_allclose(task_arithmetic(pt, experts, 0.3).double().numpy(), expected, atol=sum_atol(pt, 9))
    soup = (p + sum(e)) / 5  # the uniform soup of all five models
    np.testing.assert_allclose(model_soup(pt, experts).double().numpy(), soup, atol=sum_atol(pt, 6), rtol=0)


@pytest.mark.parametrize(
    "weights",
    [
        [0.1, 0.25, 0.2, 0.3],  # convex (T³'s rules): the chain of lerps
        [0.0, 0.4, 0.0, 0.6],  # zero weights skipped, the generalist's weight 0
        [0.0, 0.0, 0.0, 0.0],  # the generalist itself
        [0.3, 0.3, 0.3, 0.3],  # Σ w > 1 (task arithmetic): scaled, then added
        [0.5, -0.2, 0.3, 0.1],  # a negative weight: the same
    ],
)
def test_several_task_vectors_add_up_to_the_formula_whichever_passes_compute_it(vectors, weights):
    """θ_pt + Σ_k w_k·(θ_k − θ_pt) in float64 NumPy; float32 rounds each of the at most 3 operations per expert
    and pass once."""
    pt, experts = vectors
    p = pt.double().numpy()
    expected = p + sum(w * (x.double().numpy() - p) for w, x in zip(weights, experts))
    merged = add_task_vectors(pt, experts, weights, torch.empty_like(pt))
    np.testing.assert_allclose(merged.double().numpy(), expected, atol=sum_atol(pt, 3 * len(experts) + 1), rtol=0)
    if not any(weights):
        assert torch.equal(merged, pt)
    stacked = torch.empty_like(pt)  # the expression --model.compile turns into one kernel
    stacked_task_vectors(pt, torch.stack(experts), torch.tensor(weights), stacked)
    np.testing.assert_allclose(stacked.double().numpy(), expected, atol=sum_atol(pt, 3 * len(experts) + 1), rtol=0)


@pytest.mark.parametrize("weight", [0.3, 1.4, -0.5])
def test_one_task_vector_is_one_lerp_extrapolating_too(vectors, weight):
    pt, experts = vectors
    merged = add_task_vectors(pt, experts[:1], [weight], torch.empty_like(pt))
    assert torch.equal(merged, torch.lerp(pt, experts[0], weight))


def test_dare_drops_each_task_vector_with_its_own_mask(vectors):
    pt, experts = vectors
    merged = dare(pt, experts, drop=0.4, scale=0.5, seed=3)
    masks = [torch.rand(pt.numel(), generator=torch.Generator().manual_seed(3 + k)) >= 0.4 for k in range(4)]
    p = pt.double().numpy()
    expected = p + sum(0.5 / 0.6 * np.where(m.numpy(), x.double().numpy() - p, 0.0) for m, x in zip(masks, experts))
    np.testing.assert_allclose(merged.double().numpy(), expected, atol=sum_atol(pt, 9), rtol=0)
    assert len({tuple(m[:50].tolist()) for m in masks}) == 4  # four different masks
