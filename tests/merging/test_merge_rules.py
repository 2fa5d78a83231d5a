"""Static merge rules on the flat buffers against state_dict arithmetic written out in plain torch/NumPy."""

import numpy as np
import pytest
import torch

from helpers import ARCH
from tcube_lightning.loading import load_clip
from tcube_lightning.merging.rules import dare, slerp, ties
from tcube_lightning.merging.store import FusedParameterStore


@pytest.fixture(scope="module")
def setting(clip_pair):
    store = FusedParameterStore(load_clip(ARCH, clip_pair[0]), load_clip(ARCH, clip_pair[1]))
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
    merged = unflatten(store, ties(store.pt_flat, store.ft_flat, density=0.2, scale=0.8))
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
    pt, ft = store.pt_flat, store.ft_flat
    merged = dare(pt, ft, drop=0.3, scale=1.0, seed=7)
    rescaled = pt + (ft - pt) / 0.7
    dropped = torch.isclose(merged, pt, atol=0, rtol=0)
    kept = torch.isclose(merged, rescaled, atol=1e-6, rtol=1e-6)
    assert bool((dropped | kept).all())
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(dare(pt, ft, drop=0.3, scale=1.0, seed=7), merged, atol=0, rtol=0)
    assert not torch.equal(dare(pt, ft, drop=0.3, scale=1.0, seed=8), merged)


def test_slerp_per_tensor_matches_the_formula(setting):
    store, pt_sd, ft_sd = setting
    merged = unflatten(store, slerp(store.pt_flat, store.ft_flat, 0.35, store.segments))
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
