"""Checkpoints as other codebases save a CLIP: each layout is written here from the tiny open_clip model's state_dict
the way that code would save it, and must load to the same parameters, bit for bit; the prompt-learner layout's
learned context against a TPT-style text encoder written out here (prefix, context, suffix through the text
transformer), merged contexts against float64 state_dict interpolation."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from helpers import (
    ARCH,
    CLASSNAMES,
    EMBEDDING_ATOL,
    LOGITS_ATOL,
    cli_args,
    make_expert_state_dict,
    run_cli_in_process,
    sum_atol,
)
from tcube_lightning.cli.app import main
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import tokenize_prompts, zero_shot_head
from tcube_lightning.errors import InputError
from tcube_lightning.loading import load_clip, plan_models
from tcube_lightning.loading.contexts import attach_context, context_prompts, embedded_words
from tcube_lightning.merging.coefficients import LambdaMapping

PREFIXED = ["model.", "clip_model.", "clip.", "teacher.", "student.", "_orig_mod.", "module.model."]
NESTED = ["state_dict", "model", "module", "ema", "model_ema", "state_dict_ema"]


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


LAYOUTS = {
    **{f"prefix {p}": (lambda s, p=p: prefixed(s, p), p) for p in PREFIXED},
    **{f"nested {n}": (lambda s, n=n: {n: s, "epoch": 3}, f"{n}.") for n in NESTED},
    "lightning checkpoint": (
        lambda s: {"state_dict": prefixed(s, "model._orig_mod."), "optimizer_states": [{}], "global_step": 7},
        "state_dict.model._orig_mod.",
    ),
    "nested ema with module.": (lambda s: {"model_ema": prefixed(s, "module.")}, "model_ema.module."),
}


@pytest.fixture(scope="module")
def pair(clip_pair):
    return tuple(torch.load(p, weights_only=True) for p in clip_pair)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_wrapper_layout_loads_the_same_parameters_bit_for_bit(clip_pair, pair, tmp_path, layout):
    rewrite, stripped = LAYOUTS[layout]
    path = tmp_path / "expert.pt"
    torch.save(rewrite(pair[1]), path)
    loaded = plan_models(ARCH, str(clip_pair[0]), str(path)).load()
    ours = loaded.expert.state_dict()
    assert set(ours) == set(pair[1]) and all(torch.equal(ours[k], pair[1][k]) for k in pair[1])
    assert loaded.record["expert"]["mapping"] == {"stripped": stripped, "layout": "open_clip"}


def test_safetensors_with_a_prefix_and_a_plain_file_say_what_was_stripped(clip_pair, pair, tmp_path):
    save_file({k: v.contiguous() for k, v in prefixed(pair[1], "clip.").items()}, tmp_path / "expert.safetensors")
    loaded = plan_models(ARCH, str(clip_pair[0]), str(tmp_path / "expert.safetensors")).load()
    assert all(torch.equal(loaded.expert.state_dict()[k], v) for k, v in pair[1].items())
    assert loaded.record["expert"]["mapping"]["stripped"] == "clip."
    assert loaded.record["pretrained"]["mapping"] == {"stripped": None, "layout": "open_clip"}


def test_a_model_beside_its_ema_is_refused_until_key_prefix_chooses(clip_pair, pair, tmp_path):
    other = make_expert_state_dict(pair[0], seed=5)
    path = tmp_path / "both.pt"
    torch.save({"state_dict": prefixed(pair[1], "model."), "state_dict_ema": prefixed(other, "model.")}, path)
    with pytest.raises(
        InputError, match=r"under 2 prefixes \('state_dict.model.', 'state_dict_ema.model.'.*key_prefix"
    ):
        plan_models(ARCH, str(clip_pair[0]), str(path))
    loaded = plan_models(ARCH, str(clip_pair[0]), str(path), key_prefix="state_dict_ema.model.").load()
    assert all(torch.equal(loaded.expert.state_dict()[k], v) for k, v in other.items())


def test_a_pickled_module_is_refused_before_anything_is_unpickled(clip_pair, tmp_path):
    marker = tmp_path / "ran"

    class Payload:  # what unpickling it would do: create the marker file
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"model": open_clip.create_model(ARCH), "hook": Payload()}, tmp_path / "whole.pt")
    with pytest.raises(InputError, match=r"whole.pt is a whole pickled module .*torch.save\(model.state_dict\(\)"):
        plan_models(ARCH, str(clip_pair[0]), str(tmp_path / "whole.pt"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- prompt learners
def prompt_learner_file(state: dict, context: torch.Tensor, classes: int = 4) -> dict:
    """A ClipTestTimeTuning state_dict (TPT's clip/custom_clip.py): image_encoder = clip.visual, text_encoder holding
    transformer, positional_embedding, ln_final and text_projection, prompt_learner's ctx and its two buffers; no
    token embedding, no logit scale."""
    width = context.shape[1]
    tree = {}
    for key, value in state.items():
        if key.startswith("visual."):
            tree["image_encoder." + key.removeprefix("visual.")] = value
        elif key.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            tree["text_encoder." + key] = value
    tree["prompt_learner.ctx"] = context
    tree["prompt_learner.token_prefix"] = torch.zeros(classes, 1, width)
    tree["prompt_learner.token_suffix"] = torch.zeros(classes, 77 - 1 - len(context), width)
    return tree


def tpt_text_features(state: dict, context: torch.Tensor, classnames: list[str]) -> torch.Tensor:
    """TPT's TextEncoder on its PromptLearner's prompts, written out: [SOS] ctx CLASS . [EOS] embedded, positions
    added, through the text transformer (causal mask), ln_final, the EOS token's row @ text_projection; normalised."""
    model = open_clip.create_model(ARCH).eval()
    model.load_state_dict(state)
    n_ctx = len(context)
    tokens = open_clip.get_tokenizer(ARCH)([" ".join(["X"] * n_ctx) + f" {name}." for name in classnames])
    with torch.no_grad():
        embedded = model.token_embedding(tokens)
        prompts = torch.cat([embedded[:, :1], context.expand(len(tokens), -1, -1), embedded[:, 1 + n_ctx :]], dim=1)
        x = prompts + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        x = x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def words(pair):
    """The generalist's token embeddings of "a photo of a": TPT's initial context."""
    model = open_clip.create_model(ARCH)
    model.load_state_dict(pair[0])
    return embedded_words(model, open_clip.get_tokenizer(ARCH), "a photo of a")


def test_a_context_of_a_photo_of_a_gives_the_template_head_and_another_its_own(pair, words):
    tokenizer = open_clip.get_tokenizer(ARCH)
    model = open_clip.create_model(ARCH).eval()
    model.load_state_dict(pair[0])
    template = zero_shot_head(model, tokenize_prompts(tokenizer, CLASSNAMES, ["a photo of a {}."]), len(CLASSNAMES))
    attach_context(model, words, tokenizer)
    prompts = tokenizer(context_prompts(CLASSNAMES, len(words)))
    with torch.no_grad():
        learned = zero_shot_head(model, prompts, len(CLASSNAMES))
        torch.testing.assert_close(learned, template, atol=EMBEDDING_ATOL, rtol=0)
        moved = words + 0.05 * torch.randn(words.shape, generator=torch.Generator().manual_seed(0))
        attach_context(model, moved, tokenizer)
        perturbed = zero_shot_head(model, prompts, len(CLASSNAMES))
    assert (perturbed - template).abs().max() > 100 * EMBEDDING_ATOL
    torch.testing.assert_close(perturbed, tpt_text_features(pair[0], moved, CLASSNAMES), atol=EMBEDDING_ATOL, rtol=0)


@pytest.mark.parametrize("samplewise", ["loop", "vectorized"])
def test_a_prompt_learner_expert_merges_its_context_like_any_parameter(clip_pair, pair, words, tmp_path, samplewise):
    """The expert: TPT's file of the fine-tuned towers with a tuned context. Merged text towers merge the context from
    the generalist's embeddings of "a photo of a" (model.context_init): against the TPT encoder on a float64
    interpolated state_dict and context, per sample."""
    tuned = words + 0.05 * torch.randn(words.shape, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "tpt.pt"
    torch.save(prompt_learner_file(pair[1], tuned), path)
    loaded = plan_models(ARCH, str(clip_pair[0]), str(path)).load()
    mapping = loaded.record["expert"]["mapping"]
    assert mapping["layout"] == "prompt learner" and mapping["learned_context"] == {"n_ctx": 4, "width": 64}
    assert sorted(mapping["from_generalist"]) == ["logit_scale", "token_embedding.weight"]
    assert loaded.record["expert"]["head"] == "learned context (n_ctx 4)"
    assert "'a photo of a' (model.context_init)" in loaded.record["pretrained"]["head"]
    tokenizer = open_clip.get_tokenizer(ARCH)
    engine = TCubeEngine(
        loaded.pretrained,
        loaded.expert,
        [tokenize_prompts(tokenizer, CLASSNAMES, ["a photo of a {}.", "a medical image of a {}."])],
        [len(CLASSNAMES)],
        LambdaMapping(),
        samplewise=samplewise,
        heads="exact",
        context_tokens=[tokenizer(context_prompts(CLASSNAMES, 4))],
    )
    assert engine.prepare({}, extremes=False) == samplewise  # the per-row context passed the probe
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([0.0, 0.3, 0.8, 1.0])
    logits = engine.sample_merged_logits(images, weights, 0)
    ft = {**pair[1], "token_embedding.weight": pair[0]["token_embedding.weight"], "logit_scale": pair[0]["logit_scale"]}
    for i, w in enumerate(weights.tolist()):
        state = {k: ((1 - w) * pair[0][k].double() + w * ft[k].double()).float() for k in pair[0]}
        context = ((1 - w) * words.double() + w * tuned.double()).float()
        model = open_clip.create_model(ARCH).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            image = model.encode_image(images[i : i + 1], normalize=True)
            expected = model.logit_scale.exp() * image @ tpt_text_features(state, context, CLASSNAMES).T
        torch.testing.assert_close(logits[i : i + 1], expected, atol=LOGITS_ATOL + sum_atol(expected, 2), rtol=0)
    # the expert alone: its learned-context head; the generalist alone: its templates
    batch = engine.coefficients(images, 0)
    generalist = load_clip(ARCH, clip_pair[0])
    templates = tokenize_prompts(tokenizer, CLASSNAMES, ["a photo of a {}.", "a medical image of a {}."])
    with torch.no_grad():
        head = zero_shot_head(generalist, templates, len(CLASSNAMES))
        own = generalist.logit_scale.exp() * generalist.encode_image(images, normalize=True) @ head.T
    torch.testing.assert_close(batch.pt_logits, own, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(batch.ft_logits[0][-1:], logits[-1:], atol=LOGITS_ATOL, rtol=0)  # w = 1


def test_a_run_on_files_in_other_layouts_gives_the_plain_files_numbers(clip_pair, npz_root, pair, words, tmp_path):
    """The generalist as a Lightning checkpoint of a compiled model, the expert as TPT's prompt learner whose context
    is its initialisation, "a photo of a" (its head is then the template's, and the merged contexts the same words):
    the run's numbers are the plain files', field for field, and results.json says what was mapped."""
    torch.save({"state_dict": prefixed(pair[0], "model._orig_mod.")}, tmp_path / "generalist.ckpt")
    torch.save(prompt_learner_file(pair[1], words), tmp_path / "tpt.pt")
    extra = (
        "--model.methods=[zeroshot, expert, wise_ft, t3, t3_batch, dawin]",
        '--data.templates=["a photo of a {}."]',
    )
    kept = {k: pair[0][k] for k in ("token_embedding.weight", "logit_scale")}  # TPT tunes neither, nor saves them
    torch.save({**pair[1], **kept}, tmp_path / "expert.pt")
    plain, _ = run_cli_in_process(
        cli_args((clip_pair[0], tmp_path / "expert.pt"), npz_root, tmp_path / "plain", *extra)
    )
    files = (tmp_path / "generalist.ckpt", tmp_path / "tpt.pt")
    mapped, _ = run_cli_in_process(cli_args(files, npz_root, tmp_path / "mapped", *extra))
    for key in ("accuracy", "metrics", "coefficients", "diagnostics"):
        assert mapped[key] == plain[key], key
    assert mapped["models"]["pretrained"]["mapping"]["stripped"] == "state_dict.model._orig_mod."
    assert mapped["models"]["expert"]["mapping"]["layout"] == "prompt learner"
    tables = {}  # predict reads them the same way
    for name, (generalist, expert) in (("plain", (clip_pair[0], tmp_path / "expert.pt")), ("mapped", files)):
        args = [a for a in cli_args((generalist, expert), npz_root, tmp_path, *extra) if "default_root_dir" not in a]
        args = ["predict", *args[1:], '--data.sources={"a": "tiny_a.npz"}', f"--model.results_dir={tmp_path / name}p"]
        main(args)
        tables[name] = (tmp_path / f"{name}p" / "predictions" / "a.csv").read_text()
    assert tables["mapped"] == tables["plain"]
