"""Session fixtures, built once: a tiny open_clip pair (generalist and a perturbed expert), MedMNIST-format npz
splits, and one command-line run over them that several test files check.

Torch, open_clip and the package (Lightning) are imported in the fixtures, not here: pytest-xdist's controller loads
this file too, before it starts the workers, and never runs a test (those imports cost it about 10 s of a 2-core
machine, serially before the suite starts)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def clip_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Checkpoint files (plain open_clip state_dicts) of a tiny generalist and expert."""
    import open_clip
    import torch

    from helpers import ARCH, LOGIT_SCALE, make_expert_state_dict

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    pretrained = open_clip.create_model(ARCH).state_dict()
    pretrained["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE))  # CLIP's trained value: confident outputs
    expert = make_expert_state_dict(pretrained)
    torch.save(pretrained, folder / "pretrained.pt")
    torch.save(expert, folder / "expert.pt")
    return folder / "pretrained.pt", folder / "expert.pt"


@pytest.fixture(scope="session")
def expert_team(clip_pair, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Four experts of the tiny generalist, full and LoRA alternating: name → (checkpoint, θ_k as a state_dict; a
    LoRA expert's from peft's own merge). ``full_a`` is the tiny pair's expert."""
    import torch

    from helpers import ARCH, make_expert_state_dict
    from model_sources import write_peft_adapter
    from tcube_lightning.loading import load_clip

    folder = tmp_path_factory.mktemp("experts")
    pretrained = torch.load(clip_pair[0], weights_only=True)
    torch.save(make_expert_state_dict(pretrained, seed=2, scale=0.15), folder / "full_b.pt")
    team = {"full_a": (clip_pair[1], torch.load(clip_pair[1], weights_only=True))}
    for name, targets in (("lora_a", ["c_fc"]), ("lora_b", ["c_proj"])):
        peft_model = write_peft_adapter(
            load_clip(ARCH, clip_pair[0]), folder / name, r=2, lora_alpha=4, target_modules=targets
        )
        team[name] = (folder / name, peft_model.merge_and_unload().state_dict())
    team["full_b"] = (folder / "full_b.pt", torch.load(folder / "full_b.pt", weights_only=True))
    return {name: team[name] for name in ("full_a", "lora_a", "full_b", "lora_b")}


@pytest.fixture(scope="session")
def npz_root(tmp_path_factory) -> Path:
    """A folder with two 28-px test splits: 37 RGB images and 21 grayscale images."""
    from helpers import CLASSNAMES, write_medmnist_npz

    root = tmp_path_factory.mktemp("data")
    write_medmnist_npz(root / "tiny_a.npz", 37, len(CLASSNAMES), seed=0)
    write_medmnist_npz(root / "tiny_b.npz", 21, len(CLASSNAMES), rgb=False, seed=1)
    return root


@pytest.fixture(scope="session")
def batch8_run(clip_pair, npz_root, tmp_path_factory) -> tuple[dict, Path]:
    """Every method through the command line, batches of 8, γ = 20: (results.json, run folder)."""
    from helpers import GAMMA, cli_args, run_cli_in_process

    out = tmp_path_factory.mktemp("run8")
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--model.diagnose_extremes=true")
    return run_cli_in_process(cli_args(clip_pair, npz_root, out, *extra))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """The session's own Hugging Face cache: huggingface_hub and transformers read the cache location when they are
    called, so pointing it here serves open_clip's schemas, text towers and tokenizers, as a user's cache would."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def biomedclip(hf_cache, tmp_path_factory) -> dict[str, Path]:
    """A BiomedCLIP-shaped generalist (local-dir: folder and hf-hub: repository) and a full expert file."""
    from model_sources import build_biomedclip

    return build_biomedclip(tmp_path_factory.mktemp("biomedclip"), hf_cache)
