"""The model sources users hold, loaded as their own code computes them: BiomedCLIP-shaped schema models (local-dir:,
hf-hub:), peft LoRA adapters, RobustMedCLIP checkpoints and transformers CLIPModels; through the command line, each
run's zero-shot, expert and per-sample T³ predictions against models built by the adapters' own libraries."""

import json
import shutil

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
    LOGIT_SCALE,
    LOGITS_ATOL,
    ONE_FULL_EXPERT,
    TEMPLATES,
    lambda_atol,
    rounding_atol,
    run_cli_expecting_error,
    run_cli_in_process,
    write_medmnist_npz,
)
from model_sources import (
    BIOMEDCLIP_DEPTH,
    BIOMEDCLIP_REPO,
    BIOMEDCLIP_SIZE,
    ODD_MLP,
    OpenClipOracle,
    TransformersOracle,
    split_images,
    transformers_logits,
    write_peft_adapter,
    write_peft_on_transformers_clip,
    write_robustmedclip,
    write_transformers_clips,
    zero_shot_logits,
)
from tcube_lightning.engine.leaf_plan import leafwise_reason
from tcube_lightning.engine.per_sample import changed_parameters
from tcube_lightning.errors import InputError
from tcube_lightning.loading import load_clip, plan_models
from tcube_lightning.reporting.samples import read_table

BIOMEDCLIP_ATOL = rounding_atol(LOGIT_SCALE, depth=BIOMEDCLIP_DEPTH)
"""Zero-shot logits (LOGIT_SCALE × a cosine) through the deeper BiomedCLIP-shaped towers."""
HALF = ("--data.mean=[0.5, 0.5, 0.5]", "--data.std=[0.5, 0.5, 0.5]")  # BiomedCLIP-shaped models' normalisation


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_medmnist_npz(root / "small.npz", 12, len(CLASSNAMES), seed=4)
    return root


@pytest.fixture(scope="module")
def biomedclip_generalist(biomedclip):
    """The BiomedCLIP-shaped generalist as open_clip itself loads the local-dir: folder (its own weights)."""
    return open_clip.create_model(f"local-dir:{biomedclip['folder']}").eval()


@pytest.fixture(scope="module")
def biomedclip_tokens(biomedclip):
    return open_clip.get_tokenizer(f"local-dir:{biomedclip['folder']}")(
        [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    )


@pytest.fixture(scope="module")
def peft_on_biomedclip(biomedclip_generalist, tmp_path_factory):
    """peft LoRA on every timm qkv of the BiomedCLIP-shaped generalist: (adapter folder, peft's model)."""
    import copy

    folder = tmp_path_factory.mktemp("peft_biomedclip")
    model = write_peft_adapter(copy.deepcopy(biomedclip_generalist), folder, r=4, lora_alpha=4, target_modules=["qkv"])
    return folder, model


@pytest.fixture(scope="module")
def peft_on_tiny_clip(clip_pair, tmp_path_factory):
    """peft LoRA on the tiny open_clip ViT: nn.MultiheadAttention and Linear targets, a rank pattern, rsLoRA and a
    module to save."""
    folder = tmp_path_factory.mktemp("peft_tiny")
    generalist = load_clip(ARCH, clip_pair[0])
    config = {
        "r": 4,
        "lora_alpha": 0.2,
        "target_modules": ["attn", "c_fc"],
        "rank_pattern": {"c_fc": 2},
        "use_rslora": True,
        "modules_to_save": ["ln_final"],
    }
    return folder, write_peft_adapter(generalist, folder, **config)


@pytest.fixture(scope="module")
def transformers_clips(tmp_path_factory):
    return write_transformers_clips(tmp_path_factory.mktemp("transformers"))


def cli(root, out, *model_args, size=BIOMEDCLIP_SIZE, extra=()):
    return [
        "test",
        *model_args,
        f"--data.root={root}",
        '--data.sources={"s": "small.npz"}',
        f"--data.classnames={json.dumps(CLASSNAMES)}",
        f"--data.templates={json.dumps(TEMPLATES)}",
        f"--data.image_size={size}",
        "--data.batch_size=5",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.plots=false",
        "--model.methods=[zeroshot, expert, t3, t3_batch]",
        "--model.export_samples=true",
        f"--model.gamma={GAMMA}",
        "--model.diagnose_extremes=false",
        *extra,
    ]


def check_against_oracle(run_folder, oracle, images, atol):
    """Every sample's exported zero-shot and expert predictions against the oracle models at w = 0 and 1; λ from
    their JS (SciPy); each T³ prediction against the oracle model merged at that sample's own weight."""
    table = read_table(run_folder / "samples" / "s.npz")
    pt, ft = (oracle.logits(w, images).double().numpy() for w in (0.0, 1.0))
    for method, logits in (("zeroshot", pt), ("expert", ft)):
        check_predictions(table, method, logits, atol)
    assert np.abs(pt - ft).max() > 1.0  # the expert loaded is not the generalist
    lam = expit(GAMMA * jensenshannon(softmax(pt, -1), softmax(ft, -1), axis=-1) ** 2)
    assert np.ptp(lam) > 0.05  # sample-wise merging is really exercised
    np.testing.assert_allclose(table["w/t3"], lam, atol=lambda_atol(GAMMA, logits_atol=atol), rtol=0)
    per_sample = np.concatenate(
        [oracle.logits(float(w), images[i : i + 1]).double().numpy() for i, w in enumerate(table["w/t3"])]
    )
    check_predictions(table, "t3", per_sample, atol)


def check_predictions(table, method, logits, atol):
    probs = softmax(logits, -1)
    np.testing.assert_allclose(table[f"prob/{method}"], probs.max(1), atol=atol, rtol=0)  # softmax: ≤ ½ a logit's error
    top2 = np.sort(logits, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol  # a near tie may flip within rounding
    np.testing.assert_array_equal(table[f"pred/{method}"][clear], logits.argmax(1)[clear])


# --------------------------------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("schema", ["local-dir", "hf-hub"])
def test_a_schema_models_own_weights_are_the_generalist_as_open_clip_loads_them(biomedclip, hf_cache, schema):
    arch = f"local-dir:{biomedclip['folder']}" if schema == "local-dir" else f"hf-hub:{BIOMEDCLIP_REPO}"
    reference = open_clip.create_model(arch).state_dict()  # open_clip's own schema loading, from the default cache
    plan = plan_models(arch, None, str(biomedclip["expert"]), cache_dir=str(hf_cache))
    loaded = plan.load()
    assert set(loaded.pretrained.state_dict()) == set(reference)
    for name, value in loaded.pretrained.state_dict().items():
        torch.testing.assert_close(value, reference[name], atol=0, rtol=0, msg=name)
    expert = torch.load(biomedclip["expert"], weights_only=True)
    for name, value in loaded.expert.state_dict().items():
        torch.testing.assert_close(value, expert[name], atol=0, rtol=0, msg=name)
    assert plan.architecture.image_size == BIOMEDCLIP_SIZE
    assert plan.expected_normalization() == ((0.5,) * 3, (0.5,) * 3)  # its own preprocess_cfg
    with pytest.raises(InputError, match=r"trained with mean \[0.5, 0.5, 0.5\] and std \[0.5, 0.5, 0.5\]"):
        plan.check_preprocessing(BIOMEDCLIP_SIZE, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert loaded.record["pretrained"]["kind"] == "the schema's own weights"


def test_a_checkpoint_given_beside_a_schema_is_loaded_never_ignored(biomedclip):
    """open_clip ignores ``pretrained=`` beside a schema name (a log line says so); here the file is the model."""
    given = torch.load(biomedclip["expert"], weights_only=True)
    model = load_clip(f"local-dir:{biomedclip['folder']}", biomedclip["expert"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, given[name], atol=0, rtol=0, msg=name)


def test_biomedclip_from_an_offline_cache_end_to_end(
    biomedclip, hf_cache, biomedclip_generalist, biomedclip_tokens, small_split, tmp_path
):
    args = (
        f"--model.arch=hf-hub:{BIOMEDCLIP_REPO}",
        f"--model.expert_checkpoint={biomedclip['expert']}",
        f"--model.cache_dir={hf_cache}",
        *HALF,
    )
    results, folder = run_cli_in_process(cli(small_split, tmp_path, extra=args))
    assert results["models"]["pretrained"]["kind"] == "the schema's own weights"
    assert results["models"]["expert"] == {
        "kind": "open_clip checkpoint",
        "location": str(biomedclip["expert"]),
        "mapping": {"stripped": None, "layout": "open_clip"},
        "head": "templates",
    }
    assert results["samplewise"] == {"path": "vectorized", "pass": ONE_FULL_EXPERT}
    images, _ = split_images(small_split / "small.npz", BIOMEDCLIP_SIZE, (0.5,) * 3, (0.5,) * 3)
    expert = torch.load(biomedclip["expert"], weights_only=True)
    oracle = OpenClipOracle(biomedclip_generalist, biomedclip_generalist.state_dict(), expert, biomedclip_tokens, 4)
    check_against_oracle(folder, oracle, images, BIOMEDCLIP_ATOL)


def test_schema_files_missing_from_the_cache_or_folder_are_named_before_loading(biomedclip, hf_cache, tmp_path, capsys):
    with pytest.raises(
        InputError, match=r"open_clip_config.json of the Hugging Face repository tcube/elsewhere is not in"
    ):
        plan_models("hf-hub:tcube/elsewhere", None, str(biomedclip["expert"]), cache_dir=str(hf_cache))
    empty = tmp_path / "cache"
    empty.mkdir()
    with pytest.raises(InputError, match=f"is not in the local cache \\({empty}\\)"):
        plan_models(f"hf-hub:{BIOMEDCLIP_REPO}", None, str(biomedclip["expert"]), cache_dir=str(empty))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(biomedclip["folder"], no_weights, ignore=shutil.ignore_patterns("*.bin"))
    args = cli(
        tmp_path,
        tmp_path / "runs",
        f"--model.arch=local-dir:{no_weights}",
        f"--model.expert_checkpoint={biomedclip['expert']}",
        f"--model.cache_dir={hf_cache}",
        *HALF,
    )
    assert "has none of ['open_clip_model.safetensors'" in run_cli_expecting_error(args, capsys)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------ LoRA
def test_peft_lora_on_biomedclip_is_the_expert_peft_computes(
    biomedclip, hf_cache, biomedclip_generalist, biomedclip_tokens, peft_on_biomedclip, small_split, tmp_path
):
    folder, peft_model = peft_on_biomedclip
    plan = plan_models(f"local-dir:{biomedclip['folder']}", None, str(folder), cache_dir=str(hf_cache))
    loaded = plan.load()
    expert = loaded.expert.expert(loaded.pretrained)
    images = torch.randn(3, 3, BIOMEDCLIP_SIZE, BIOMEDCLIP_SIZE, generator=torch.Generator().manual_seed(2))
    ours = zero_shot_logits(expert, images, biomedclip_tokens, 4)
    theirs = zero_shot_logits(peft_model, images, biomedclip_tokens, 4)  # peft's forward: x·Wᵀ + s·(x·Aᵀ)·Bᵀ
    torch.testing.assert_close(ours, theirs, atol=BIOMEDCLIP_ATOL, rtol=0)
    record = loaded.record["expert"]
    assert (record["kind"], record["rank"], record["scale"]) == ("LoRA (peft)", [4], [1.0])
    assert record["targets"] == [f"visual.trunk.blocks.{i}.attn.qkv.weight" for i in range(6)]
    # End to end, T³ against per-sample merges of peft's own merged expert.
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    args = (
        f"--model.arch=local-dir:{biomedclip['folder']}",
        f"--model.expert_checkpoint={folder}",
        f"--model.cache_dir={hf_cache}",
        *HALF,
    )
    results, run = run_cli_in_process(cli(small_split, tmp_path, extra=args))
    assert results["models"]["expert"]["targets"] == record["targets"]
    assert results["samplewise"] == {"path": "vectorized", "pass": "leaf-wise, low-rank (LoRA)"}
    images, _ = split_images(small_split / "small.npz", BIOMEDCLIP_SIZE, (0.5,) * 3, (0.5,) * 3)
    oracle = OpenClipOracle(biomedclip_generalist, biomedclip_generalist.state_dict(), merged, biomedclip_tokens, 4)
    check_against_oracle(run, oracle, images, BIOMEDCLIP_ATOL)


def test_peft_lora_on_an_open_clip_vit_counts_multihead_attention_as_peft_does(
    clip_pair, peft_on_tiny_clip, small_split, tmp_path
):
    folder, peft_model = peft_on_tiny_clip
    loaded = plan_models(ARCH, str(clip_pair[0]), str(folder)).load()
    expert = loaded.expert.expert(loaded.pretrained)
    tokens = open_clip.get_tokenizer(ARCH)([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        zero_shot_logits(expert, images, tokens, 4),
        zero_shot_logits(peft_model, images, tokens, 4),
        atol=LOGITS_ATOL,
        rtol=0,
    )
    record = loaded.record["expert"]
    assert record["rank"] == [2, 4] and "PR #3774" in record["notes"][0]
    assert record["replaced"] == ["ln_final.bias", "ln_final.weight"]
    # rsLoRA: alpha/√r = 0.1 (attn, r = 4) and 0.1·√2 (c_fc, r = 2); the MultiheadAttention out_proj update counts
    # twice (0.2)
    assert record["scale"] == pytest.approx([0.1, 0.1 * 2**0.5, 0.2])
    # End to end, T³ (the low-rank pass, attention split into its projections) against per-sample merges of peft's
    # own merged expert.
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    args = (
        f"--model.arch={ARCH}",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={folder}",
    )
    results, run = run_cli_in_process(cli(small_split, tmp_path, size=28, extra=args))
    assert results["samplewise"] == {"path": "vectorized", "pass": "leaf-wise, low-rank (LoRA)"}
    generalist = load_clip(ARCH, clip_pair[0])
    oracle = OpenClipOracle(generalist, generalist.state_dict(), merged, tokens, 4)
    check_against_oracle(run, oracle, split_images(small_split / "small.npz", 28)[0], LOGITS_ATOL)


def test_robustmedclip_lora_is_the_expert_its_code_computes(
    biomedclip, hf_cache, biomedclip_generalist, biomedclip_tokens, small_split, tmp_path
):
    their_expert = write_robustmedclip(biomedclip_generalist, tmp_path / "model.pth")
    loaded = plan_models(f"local-dir:{biomedclip['folder']}", None, str(tmp_path / "model.pth"), str(hf_cache)).load()
    expert = loaded.expert.expert(loaded.pretrained)
    images = torch.randn(3, 3, BIOMEDCLIP_SIZE, BIOMEDCLIP_SIZE, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        zero_shot_logits(expert, images, biomedclip_tokens, 4),
        zero_shot_logits(their_expert, images, biomedclip_tokens, 4),
        atol=BIOMEDCLIP_ATOL,
        rtol=0,
    )
    assert loaded.record["expert"]["kind"] == "LoRA (RobustMedCLIP)" and loaded.record["expert"]["scale"] == [1.0]
    assert len(loaded.record["expert"]["targets"]) == 6  # one qkv per block; q, k and v each an update of its rows
    # End to end, T³ against per-sample merges of the expert written out from the checkpoint's factors.
    factors, merged = torch.load(tmp_path / "model.pth", weights_only=True), biomedclip_generalist.state_dict()
    merged = {k: v.clone() for k, v in merged.items()}
    for i in range(len(biomedclip_generalist.visual.trunk.blocks)):
        qkv = merged[f"visual.trunk.blocks.{i}.attn.qkv.weight"]
        width = qkv.shape[1]
        for j, part in enumerate("qkv"):
            prefix = f"lora_vit.lora_vit.trunk.blocks.{i}.attn.qkv.linear_"
            down, up = factors[f"{prefix}a_{part}.weight"], factors[f"{prefix}b_{part}.weight"]
            qkv[j * width : (j + 1) * width] += up @ down
    args = (
        f"--model.arch=local-dir:{biomedclip['folder']}",
        f"--model.expert_checkpoint={tmp_path / 'model.pth'}",
        f"--model.cache_dir={hf_cache}",
        *HALF,
    )
    results, run = run_cli_in_process(cli(small_split, tmp_path / "run", extra=args))
    assert results["models"]["expert"]["kind"] == "LoRA (RobustMedCLIP)"
    oracle = OpenClipOracle(biomedclip_generalist, biomedclip_generalist.state_dict(), merged, biomedclip_tokens, 4)
    images, _ = split_images(small_split / "small.npz", BIOMEDCLIP_SIZE, (0.5,) * 3, (0.5,) * 3)
    check_against_oracle(run, oracle, images, BIOMEDCLIP_ATOL)
    # A checkpoint whose frozen towers differ from the generalist's belongs to another base model.
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    state["text_encoder.proj.0.weight"] = state["text_encoder.proj.0.weight"] + 1
    torch.save(state, tmp_path / "other.pth")
    plan = plan_models(f"local-dir:{biomedclip['folder']}", None, str(tmp_path / "other.pth"), str(hf_cache))
    with pytest.raises(
        InputError, match=r"text_encoder.proj.0.weight differs from the generalist's text.proj.0.weight"
    ):
        plan.load()


def test_wrong_adapters_are_refused_naming_the_field(biomedclip, hf_cache, clip_pair, peft_on_tiny_clip, tmp_path):
    folder, _ = peft_on_tiny_clip
    with pytest.raises(InputError, match=r"made on a CLIP, and the generalist \(CustomTextCLIP\).*another base model"):
        plan_models(f"local-dir:{biomedclip['folder']}", None, str(folder), str(hf_cache)).load()
    with pytest.raises(InputError, match=r"pretrained_checkpoint: .* is a peft LoRA adapter"):
        plan_models(ARCH, str(folder), str(clip_pair[1]))
    config = json.loads((folder / "adapter_config.json").read_text())
    for change, message in (
        ({"r": 8}, "has rank 4 \\(lora_A\\) and 4 \\(lora_B\\) but adapter_config.json says r=8"),
        ({"use_dora": True}, "'use_dora': True.* not supported"),
        ({"bias": "all"}, "bias is 'all': adapters that train biases"),
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa', which changes the base weights"),
    ):
        changed = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(folder, changed)
        (changed / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(InputError, match=f"model.expert_checkpoint: {changed}.*{message}"):
            plan_models(ARCH, str(clip_pair[0]), str(changed)).load()


def test_unreadable_weights_files_are_named(clip_pair, peft_on_tiny_clip, transformers_clips, tmp_path):
    for source, weights in (
        (peft_on_tiny_clip[0], "adapter_model.safetensors"),
        (transformers_clips["ft"], "model.safetensors"),
    ):
        broken = tmp_path / source.name
        shutil.copytree(source, broken)
        (broken / weights).write_bytes(b"not a file of tensors")
        generalist = clip_pair[0] if weights.startswith("adapter") else transformers_clips["pt"]
        arch = ARCH if weights.startswith("adapter") else None
        with pytest.raises(InputError, match=f"model.expert_checkpoint: {broken / weights} could not be read"):
            plan_models(arch, str(generalist), str(broken)).load()  # an adapter: refused while planning


# ---------------------------------------------------------------------------------------------------- transformers
def test_transformers_clip_checkpoints_run_every_path_as_transformers_computes_them(
    transformers_clips, small_split, tmp_path, capsys
):
    plan = plan_models(None, str(transformers_clips["pt"]), str(transformers_clips["ft"]))
    loaded = plan.load()
    changed = set(changed_parameters(loaded.pretrained, loaded.expert))
    assert leafwise_reason(loaded.pretrained, changed) is None  # open_clip's standard CLIP: the exact pass runs it
    assert plan.architecture.image_size == 28 and plan.architecture.quick_gelu
    tokenizer = plan.architecture.tokenizer()
    tokens = tokenizer([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    images, _ = split_images(small_split / "small.npz", 28)
    oracle = TransformersOracle(transformers_clips["pt"], transformers_clips["ft"], tokens, 4)
    for w, model in ((0.0, loaded.pretrained), (1.0, loaded.expert)):
        torch.testing.assert_close(
            zero_shot_logits(model, images, tokens, 4), oracle.logits(w, images), atol=LOGITS_ATOL, rtol=0
        )
    model_args = (
        f"--model.pretrained_checkpoint={transformers_clips['pt']}",
        f"--model.expert_checkpoint={transformers_clips['ft']}",
        "--model.samplewise=vectorized",
    )
    results, run = run_cli_in_process(cli(small_split, tmp_path / "run", size=28, extra=model_args))
    assert results["models"]["architecture"] == f"the CLIPModel config of {transformers_clips['pt']}"
    assert results["samplewise"] == {"path": "vectorized", "pass": ONE_FULL_EXPERT}
    check_against_oracle(run, oracle, images, LOGITS_ATOL)
    # A vision-only checkpoint, and an architecture that is not the checkpoint's, are refused before anything loads.
    for arch, expert, message in (
        (None, transformers_clips["vision_only"], "is a vision-only transformers checkpoint"),
        (ARCH, transformers_clips["ft"], "is a CLIPModel of another architecture than tcube-tiny-clip.*embed_dim"),
    ):
        args = cli(
            small_split,
            tmp_path / "refused",
            *([f"--model.arch={arch}"] if arch else []),
            extra=(f"--model.pretrained_checkpoint={transformers_clips['pt']}", f"--model.expert_checkpoint={expert}"),
        )
        assert message.split(".*")[0] in run_cli_expecting_error(args, capsys)


@pytest.fixture(scope="module")
def peft_on_transformers_clip(transformers_clips, tmp_path_factory):
    return write_peft_on_transformers_clip(transformers_clips["pt"], tmp_path_factory.mktemp("peft_clipmodel"))


def test_peft_lora_on_a_transformers_clip_is_the_expert_peft_computes(
    transformers_clips, peft_on_transformers_clip, small_split, tmp_path
):
    adapter, peft_model, merged = peft_on_transformers_clip
    plan = plan_models(None, str(transformers_clips["pt"]), str(adapter))
    loaded = plan.load()
    tokens = plan.architecture.tokenizer()([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    images, _ = split_images(small_split / "small.npz", 28)
    expert = loaded.expert.expert(loaded.pretrained)
    theirs = transformers_logits(peft_model, images, tokens, 4)  # peft's forward on transformers' CLIPModel
    torch.testing.assert_close(zero_shot_logits(expert, images, tokens, 4), theirs, atol=LOGITS_ATOL, rtol=0)
    targets = loaded.record["expert"]["targets"]
    assert {"visual.proj", "text_projection", "visual.transformer.resblocks.1.attn.in_proj_weight"} <= set(targets)
    assert {"transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_proj.weight"} <= set(targets)
    # End to end on the low-rank pass, against transformers' forward of models interpolated towards peft's own merge.
    model_args = (f"--model.pretrained_checkpoint={transformers_clips['pt']}", f"--model.expert_checkpoint={adapter}")
    results, run = run_cli_in_process(
        cli(small_split, tmp_path, *model_args, size=28, extra=("--model.samplewise=vectorized",))
    )
    assert results["samplewise"] == {"path": "vectorized", "pass": "leaf-wise, low-rank (LoRA)"}
    check_against_oracle(run, TransformersOracle(transformers_clips["pt"], merged, tokens, 4), images, LOGITS_ATOL)


def test_adapters_for_another_base_are_refused_by_option_before_any_weights_load(
    transformers_clips,
    peft_on_transformers_clip,
    peft_on_tiny_clip,
    clip_pair,
    small_split,
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setattr("tcube_lightning.loading.sources.load_source", lambda *a: pytest.fail("a model was loaded"))
    on_clipmodel, on_open_clip = peft_on_transformers_clip[0], peft_on_tiny_clip[0]
    for generalist, adapter, message in (
        (
            (f"--model.arch={ARCH}", f"--model.pretrained_checkpoint={clip_pair[0]}"),
            on_clipmodel,
            f"model.expert_checkpoint: {on_clipmodel} is an adapter made on a transformers CLIPModel, and the "
            f"generalist is {ARCH}: give that CLIPModel's folder as model.pretrained_checkpoint",
        ),
        (
            (f"--model.pretrained_checkpoint={transformers_clips['pt']}",),
            on_open_clip,
            f"model.expert_checkpoint: {on_open_clip} is an adapter made on a CLIP, and the generalist is a "
            "transformers CLIPModel",
        ),
        (
            (f"--model.pretrained_checkpoint={transformers_clips['odd_pt']}",),
            on_clipmodel,
            "vision_model.encoder.layers.0.mlp.fc1's update is 64×32 but that layer of the generalist is 115×56",
        ),
    ):
        args = cli(small_split, tmp_path, *generalist, size=28, extra=(f"--model.expert_checkpoint={adapter}",))
        assert message in run_cli_expecting_error(args, capsys)


def test_an_mlp_width_that_is_no_multiple_of_the_width_converts_exactly(transformers_clips, small_split):
    loaded = plan_models(None, str(transformers_clips["odd_pt"]), str(transformers_clips["odd_ft"])).load()
    assert loaded.pretrained.visual.transformer.resblocks[0].mlp.c_fc.out_features == ODD_MLP["vision_mlp"]
    tokens = open_clip.SimpleTokenizer()([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    images, _ = split_images(small_split / "small.npz", 28)
    oracle = TransformersOracle(transformers_clips["odd_pt"], transformers_clips["odd_ft"], tokens, 4)
    for w, model in ((0.0, loaded.pretrained), (1.0, loaded.expert)):
        torch.testing.assert_close(
            zero_shot_logits(model, images, tokens, 4), oracle.logits(w, images), atol=LOGITS_ATOL, rtol=0
        )
