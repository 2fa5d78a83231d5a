"""Writers of the model sources users hold, built offline at tiny sizes with the libraries that make them: a
BiomedCLIP-shaped open_clip model (timm ViT image tower, Hugging Face BERT text tower) as a ``local-dir:`` folder and
as an ``hf-hub:`` repository of a Hugging Face cache, peft LoRA adapters, a RobustMedCLIP-style checkpoint and
transformers CLIPModel folders; and the adapters' own forwards, the oracles the loaded experts are checked against."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from helpers import LOGIT_SCALE, make_expert_state_dict

BIOMEDCLIP_REPO, BERT_REPO = "tcube/tiny-biomedclip", "tcube/tiny-bert"
BIOMEDCLIP_SIZE = 160
"""timm's ``test_vit`` (a real VisionTransformer: patch conv, cls/pos, fused qkv, Mlp, LayerNorm; 371k parameters)
takes 160-px images; open_clip passes timm no image size, so BiomedCLIP's ViT-B/16 would need 224 px and 86M."""
BIOMEDCLIP_DEPTH = 48
"""Sequential float32 rounding stages through the BiomedCLIP-shaped towers (for ``rounding_atol``): patch embedding,
position, 6 × (norm, attention, residual, norm, MLP, residual), final norm, pooling, projection and normalisation in
the image tower is about 42; the 2-layer BERT with its MLP projection is shallower."""
BERT_WORDS = ["a", "photo", "of", "medical", "image", "circle", "square", "triangle", "cross", "ring"]


def biomedclip_config(text: str) -> dict:
    """BiomedCLIP's open_clip_config.json, scaled down: same keys, a tiny timm ViT and a tiny BERT (``text``: its
    Hub repository or folder); normalisation 0.5/0.5, which data must then use."""
    return {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": BIOMEDCLIP_SIZE,
            },
            "text_cfg": {
                "hf_model_name": text,
                "hf_tokenizer_name": text,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 32,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }


def write_hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Hugging Face's cache layout for a downloaded repository: refs/main names the snapshot holding the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("0123abc")
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return snapshot


def write_tiny_bert(folder: Path) -> list[Path]:
    """A 2-layer BERT's config.json and a word-piece vocabulary (the prompts' words, then letters) with its
    tokenizer_config.json: what an offline cache holds of BiomedCLIP's text repository."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *BERT_WORDS, *[c for c in letters if c != "a"]]
    vocab += [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(folder)
    return [folder / "config.json", folder / "vocab.txt", folder / "tokenizer_config.json"]


@torch.no_grad()
def variance_preserving(model: nn.Module) -> nn.Module:
    """Every weight matrix redrawn with variance 1/fan-in: the libraries' small initial weights make every image and
    prompt look alike, and the generalist and expert agree everywhere."""
    for param in model.parameters():
        if param.ndim >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5)
    return model


def build_biomedclip(root: Path, cache: Path) -> dict[str, Path]:
    """The generalist as a local-dir: folder and as the hf-hub: repository BIOMEDCLIP_REPO in ``cache`` (whose
    default location the caller has pointed at it), with BERT_REPO beside it; a full expert file (the generalist
    plus seeded noise). Built and loaded with open_clip's own schema code."""
    bert_files = write_tiny_bert(root / "bert")
    write_hub_repo(cache, BERT_REPO, {f.name: f for f in bert_files})
    folder = root / "biomedclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(biomedclip_config(BERT_REPO)))
    for file in bert_files[1:]:  # a local-dir: folder's tokenizer is read from the folder itself
        shutil.copy(file, folder / file.name)
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False)
    state = variance_preserving(model).state_dict()
    state["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    write_hub_repo(cache, BIOMEDCLIP_REPO, {f.name: f for f in folder.iterdir()})
    torch.save(make_expert_state_dict(state, scale=0.2), root / "biomedclip_expert.pt")
    return {"folder": folder, "expert": root / "biomedclip_expert.pt"}


def open_clip_model(arch: str) -> nn.Module:
    """A model as open_clip itself loads it, the independent reference: ``local-dir:``/``hf-hub:`` with their own
    weights, anything else by name with random weights (the caller loads some)."""
    return open_clip.create_model(arch).eval()


# ---------------------------------------------------------------------------------------------------- peft adapters
def write_peft_adapter(model: nn.Module, folder: Path, **config) -> nn.Module:
    """A peft LoRA adapter on ``model`` (changed in place into peft's model, which is returned), with random A and B
    (init_lora_weights=False) so that the expert differs; ``modules_to_save`` copies get seeded noise."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return peft_model.eval()


# ---------------------------------------------------------------------------------------------------- RobustMedCLIP
class QkvWithLora(nn.Module):
    """RobustMedCLIP's LoRA on a timm qkv, as its paper and code describe it: q, k and v each add B·A·x to their
    third of the output, unscaled."""

    def __init__(self, qkv: nn.Linear, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.qkv, self.factors = qkv, factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        updates = [F.linear(F.linear(x, down), up) for down, up in (self.factors[p] for p in "qkv")]
        return self.qkv(x) + torch.cat(updates, dim=-1)


def write_robustmedclip(generalist: nn.Module, path: Path, rank: int = 4) -> nn.Module:
    """RobustMedCLIP's model.pth layout for ``generalist`` (its image tower under ``lora_vit.lora_vit.`` with each
    qkv wrapped as ``qkv.qkv``, the text tower under ``text_encoder.``, no logit scale) with seeded LoRA factors;
    returns the expert as RobustMedCLIP computes it (a copy of the generalist with every qkv wrapped)."""
    import copy

    expert = copy.deepcopy(generalist)
    state = {}
    for key, value in generalist.state_dict().items():
        if key.startswith("visual."):
            state["lora_vit.lora_vit." + key.removeprefix("visual.").replace(".attn.qkv.", ".attn.qkv.qkv.")] = value
        elif key.startswith("text."):
            state["text_encoder." + key.removeprefix("text.")] = value
    g = torch.Generator().manual_seed(7)
    for i, block in enumerate(expert.visual.trunk.blocks):
        width = block.attn.qkv.in_features
        factors = {
            p: (0.2 * torch.randn(rank, width, generator=g), 0.2 * torch.randn(width, rank, generator=g)) for p in "qkv"
        }
        for p, (down, up) in factors.items():
            state[f"lora_vit.lora_vit.trunk.blocks.{i}.attn.qkv.linear_a_{p}.weight"] = down
            state[f"lora_vit.lora_vit.trunk.blocks.{i}.attn.qkv.linear_b_{p}.weight"] = up
        block.attn.qkv = QkvWithLora(block.attn.qkv, factors)
    torch.save(state, path)
    return expert.eval()


# ----------------------------------------------------------------------------------------------- transformers CLIP
def tiny_clip_config(vision_width: int = 32, vision_mlp: int = 64):
    from transformers import CLIPConfig

    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
    }
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": vision_mlp,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": 28,
        "patch_size": 4,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


ODD_MLP = {"vision_width": 56, "vision_mlp": 115}
"""A vision tower whose MLP width is not a multiple of its width: 115 / 56 · 56 is 114.99… in floats."""


def write_transformers_clips(root: Path) -> dict[str, Path]:
    """CLIPModel folders saved by transformers (a generalist and an expert = generalist + seeded noise, logit scale
    100) with OpenAI's normalisation in preprocessor_config.json: the tiny pair, and a pair with an odd MLP width
    (``ODD_MLP``); and a vision-only CLIPVisionModel folder."""
    from transformers import CLIPModel, CLIPVisionModel

    preprocessor = {"image_mean": list(OPENAI_DATASET_MEAN), "image_std": list(OPENAI_DATASET_STD)}
    for pair, sizes in (("", {}), ("odd_", ODD_MLP)):
        torch.manual_seed(0)
        generalist = variance_preserving(CLIPModel(tiny_clip_config(**sizes)))
        state = generalist.state_dict()
        state["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE))
        generalist.load_state_dict(state)
        generalist.save_pretrained(root / f"hf_{pair}pt")
        expert = CLIPModel(tiny_clip_config(**sizes))
        expert.load_state_dict(make_expert_state_dict(state, scale=0.2))
        expert.save_pretrained(root / f"hf_{pair}ft")
        for name in (f"hf_{pair}pt", f"hf_{pair}ft"):
            (root / name / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    CLIPVisionModel(tiny_clip_config().vision_config).save_pretrained(root / "hf_vision_only")
    folders = {
        "pt": "hf_pt",
        "ft": "hf_ft",
        "odd_pt": "hf_odd_pt",
        "odd_ft": "hf_odd_ft",
        "vision_only": "hf_vision_only",
    }
    return {key: root / name for key, name in folders.items()}


def write_peft_on_transformers_clip(folder: Path, root: Path) -> tuple[Path, nn.Module, Path]:
    """A peft LoRA adapter on the CLIPModel in ``folder`` (every Linear kind: q/k/v/out_proj, fc1, fc2, both
    projections), saved in ``root``/adapter; returns it, peft's model (its forward: the oracle of the expert) and
    peft's own merge (``merge_and_unload``) saved as a CLIPModel folder, ``root``/merged."""
    import copy
    import shutil

    from transformers import CLIPModel

    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "visual_projection", "text_projection"]
    peft_model = write_peft_adapter(
        CLIPModel.from_pretrained(folder), root / "adapter", r=2, lora_alpha=4, target_modules=targets
    )
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(root / "merged")
    shutil.copy(folder / "preprocessor_config.json", root / "merged")
    return root / "adapter", peft_model, root / "merged"


# ------------------------------------------------------------------------------------------------------- oracles
def split_images(npz: Path, size: int, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
    """A MedMNIST npz split's test images through CLIP's evaluation transform, and its labels."""
    import numpy as np
    from PIL import Image

    raw = np.load(npz)
    transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    images = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in raw["test_images"]])
    return images, raw["test_labels"][:, 0]


def interpolated(pt: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """(1 − w)·θ_pt + w·θ_ft for every floating-point entry, written out by hand."""
    return {k: (1 - w) * pt[k] + w * ft[k] if pt[k].is_floating_point() else pt[k] for k in pt}


class OpenClipOracle:
    """Zero-shot logits of open_clip models loaded from interpolated state_dicts (one model built, reloaded)."""

    def __init__(self, model: nn.Module, pt: dict, ft: dict, tokens: torch.Tensor, num_classes: int) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()  # reloaded below: the caller's model and tensors stay as they are
        self.pt, self.ft = ({k: v.clone() for k, v in sd.items()} for sd in (pt, ft))
        self.tokens, self.num_classes = tokens, num_classes

    def logits(self, w: float, images: torch.Tensor) -> torch.Tensor:
        self.model.load_state_dict(interpolated(self.pt, self.ft, w))
        return zero_shot_logits(self.model, images, self.tokens, self.num_classes)


@torch.no_grad()
def zero_shot_logits(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """open_clip's encoders, the zero-shot head written out: normalised prompt embeddings averaged per class."""
    text = F.normalize(model.encode_text(tokens), dim=-1)
    head = F.normalize(text.view(num_classes, -1, text.shape[-1]).mean(1), dim=-1)
    return model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ head.T


class TransformersOracle:
    """Zero-shot logits of transformers CLIPModels loaded from interpolated transformers state_dicts: nothing of the
    conversion to open_clip is involved. The text is tokenized as the run does (OpenAI's BPE)."""

    def __init__(self, folder_pt: Path, folder_ft: Path, tokens: torch.Tensor, num_classes: int) -> None:
        from transformers import CLIPModel

        pt_model, ft_model = CLIPModel.from_pretrained(folder_pt), CLIPModel.from_pretrained(folder_ft)
        self.pt, self.ft = ({k: v.clone() for k, v in m.state_dict().items()} for m in (pt_model, ft_model))
        self.model = pt_model.eval()  # reloaded below: hence the copies above
        self.tokens, self.num_classes = tokens, num_classes

    def logits(self, w: float, images: torch.Tensor) -> torch.Tensor:
        self.model.load_state_dict(interpolated(self.pt, self.ft, w))
        return transformers_logits(self.model, images, self.tokens, self.num_classes)


@torch.no_grad()
def transformers_logits(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Zero-shot logits by transformers' own CLIPModel forward (a peft model's too): prompt embeddings averaged per
    class."""
    out = model(input_ids=tokens, pixel_values=images)
    head = F.normalize(out.text_embeds.view(num_classes, -1, out.text_embeds.shape[-1]).mean(1), dim=-1)
    return model.logit_scale.exp() * out.image_embeds @ head.T
