"""The model engine, in plain torch (it imports no Lightning): the generalist and its experts in a fused parameter
store, the prompt tokens and every zero-shot head, the per-batch coefficients, and the logits of every model a method
asks for. Merge weights are one per expert: a vector, or per row a matrix (rows × experts); with one expert a number
or a vector of rows serves as well.

The LightningModule drives it (devices, metrics, splits); tests use it directly, without a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from tcube_lightning.engine.heads import HeadInterpolant, fit_head_interpolant
from tcube_lightning.engine.leaf_plan import leafwise_reason
from tcube_lightning.engine.per_sample import LeafWisePass, per_sample_loop
from tcube_lightning.engine.row_merge import min_tokens
from tcube_lightning.engine.zero_shot import clip_logits, zero_shot_head
from tcube_lightning.errors import InputError
from tcube_lightning.loading.architecture import image_side
from tcube_lightning.loading.contexts import uses_own_context
from tcube_lightning.loading.lora import LoraAdapter
from tcube_lightning.merging.batch_rules import DAWIN_MTL_BUDGET, BatchContext
from tcube_lightning.merging.coefficients import KExperts, LambdaMapping, generalised_js
from tcube_lightning.merging.methods import Method
from tcube_lightning.merging.store import ExpertStore, image_tower_parameter

SampleWisePath = Literal["auto", "vectorized", "loop"]
HeadMode = Literal["interpolated", "exact"]
StaticRule = Callable[[ExpertStore], torch.Tensor]
PROBE_TOLERANCE = 1e-3
"""The largest difference of unit-norm embeddings between the leaf-wise pass and per-sample merges on the set-up's
probe: float32 rounding through a deep tower stays near 1e-6, a model whose code mixes rows is off by far more."""


@dataclass(frozen=True)
class BatchCoefficients:
    """One batch's shared forwards and T³'s coefficients."""

    pt_logits: torch.Tensor
    ft_logits: torch.Tensor
    """Each expert's logits: experts × rows × classes."""
    finite: torch.Tensor
    """Rows whose pretrained and expert logits are all finite; the others get JS = 0."""
    js: torch.Tensor
    """JS between the generalist and each expert: rows × experts."""
    lambdas: dict[str, torch.Tensor]
    """λ per sample and expert for each T³ setting: ``""`` the run's own, the others by ``model.grid`` label."""
    weights: dict[str, torch.Tensor]
    """T³'s weights on the experts per sample (rows × experts) for each setting, from λ through ``lambda_weights``
    and, with several experts, ``model.k_experts``'s rule."""
    generalised_js: torch.Tensor | None = None
    """With several experts, the generalised JS of the generalist's and every expert's distributions, per row."""


class TCubeEngine(nn.Module):
    """Both models and everything computed from them.

    Args:
        pretrained: The generalist open_clip CLIP.
        experts: The fine-tuned experts (or the one), each of the same architecture or a LoRA adapter on
            ``pretrained`` (then no full copy of it is kept: ``ExpertStore``).
        prompt_tokens: Token ids of every (class, template) prompt, one tensor per class set (splits may differ
            in their classes), class-major.
        class_counts: Number of classes of each class set.
        mapping: T³'s settings (λ range, γ, which model λ weights, JS's base).
        grid: Further T³ settings by label (``model.grid``), computed from the same JS.
        merge_text: Merged models get their own text tower's zero-shot head; False keeps the pretrained head.
        samplewise: ``vectorized``, ``loop`` or ``auto`` (vectorized where a pass runs the model exactly, except
            exact heads on CPU, where a text pass per sample makes the loop faster).
        compile: Run the forwards, and the merge of several full experts, through ``torch.compile``.
        heads: ``interpolated``: the zero-shot heads of merged text towers come from an interpolant in w fitted
            once per run (``heads.py``); ``exact``: a text pass over every class prompt per merged weight.
        head_tolerance: The largest change of a logit the interpolated heads may cause at the check points.
        k_experts: With several experts, how T³'s per-expert coefficients combine (``KExperts``).
        expert_names: The experts' names (results and AdaMerging's record).
        context_tokens: Where a model has a learned prompt context (``loading.contexts``): the token ids of each class
            set's context prompts (one per class); models whose context is their own take their head from these, and
            so do merged text towers (the merged context). None: every head from the templates.
    """

    def __init__(
        self,
        pretrained: nn.Module,
        experts: nn.Module | LoraAdapter | list[nn.Module | LoraAdapter],
        prompt_tokens: list[torch.Tensor],
        class_counts: list[int],
        mapping: LambdaMapping,
        grid: dict[str, LambdaMapping] | None = None,
        merge_text: bool = True,
        samplewise: SampleWisePath = "auto",
        compile: bool = False,
        heads: HeadMode = "interpolated",
        head_tolerance: float = 1e-4,
        k_experts: KExperts = KExperts(),
        expert_names: list[str] | None = None,
        context_tokens: list[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        experts = experts if isinstance(experts, list) else [experts]
        self.store = ExpertStore(pretrained, experts, text_tower=merge_text)
        self.count, self.k_experts = len(experts), k_experts
        self.expert_names = list(expert_names or (["expert"] if self.count == 1 else map(str, range(self.count))))
        lora = [isinstance(e, LoraAdapter) for e in experts]
        self.pass_name = "leaf-wise" + (
            ", low-rank (LoRA)"
            if all(lora)
            else ", full and low-rank"
            if any(lora)
            else f", weights merged per row in leaves of at least {min_tokens(self.count)} tokens per row"
        )
        changed = set().union(*(self.store.changed(k) for k in range(self.count)))
        changed |= set().union(*(e.changed_parameters() for e in experts if isinstance(e, LoraAdapter)))
        self.text_changed = not all(map(image_tower_parameter, changed))
        """Some expert changes the text tower: merged models' heads differ from the generalist's (else its head is
        exact for them all, and free)."""
        self.unsupported_reason = leafwise_reason(pretrained, changed)
        if samplewise == "vectorized" and self.unsupported_reason is not None:
            reason = self.unsupported_reason
            raise InputError(f"model.samplewise=vectorized cannot run this model: {reason}; use loop or auto")
        for index, tokens in enumerate(prompt_tokens):
            self.register_buffer(f"prompt_tokens_{index}", tokens, persistent=False)
        for index, tokens in enumerate(context_tokens or []):
            self.register_buffer(f"context_tokens_{index}", tokens, persistent=False)
        self.merged_context = context_tokens is not None
        """Merged text towers merge a learned context: their heads come from the context prompts."""
        self.class_counts = list(class_counts)
        self.mapping, self.samplewise, self.compile = mapping, samplewise, compile
        self.merge_text = merge_text and self.text_changed
        self.settings = {"": mapping, **(grid or {})}
        self.head_mode, self.head_tolerance = heads, head_tolerance

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def prepare(
        self, static_rules: dict[str, StaticRule], extremes: bool, weight_range: tuple[float, float] | None = None
    ) -> str:
        """On the device, once per run: choose the sample-wise path, compile if asked, and compute the heads of
        both models, of every static merge (``static_rules``, by method name), with ``extremes`` of the models
        at λ_min and λ_max, and the head interpolants over ``weight_range`` (the weights the dynamic methods
        can merge at). Returns the chosen path (``vectorized`` or ``loop``)."""
        # Set here, not in __init__: ddp_spawn pickles the module, and compiled functions do not pickle.
        self.image_logits, self.text_head = self._compiled(clip_logits), self._compiled(zero_shot_head)
        if self.compile:
            self.store.compile_merge()
        self.vectorized_logits, self.vectorized = None, None
        if self.unsupported_reason is None and self.samplewise != "loop":
            self.vectorized = self._per_sample_pass()
            if self.vectorized is not None:
                self.vectorized_logits = self._compiled(self.vectorized.logits)
        path = self.samplewise
        if path == "auto":  # by the benchmark's measurements (README)
            text_passes = self.merge_text and self.head_mode == "exact"
            cheap_here = self.store.pt_flat.device.type != "cpu" or not text_passes
            path = "vectorized" if cheap_here and self.vectorized_logits is not None else "loop"
        self.path = path
        sets = range(len(self.class_counts))
        self.pt_heads = [self._own_head(self.store.pretrained, c) for c in sets]
        self.expert_heads = [[self._own_head(self.store.expert_model(k), c) for c in sets] for k in range(self.count)]
        self.static_params = {name: rule(self.store) for name, rule in static_rules.items()}
        self.static_heads = {
            name: [self._merged_head(self.store.load(flat), c) for c in sets]
            for name, flat in self.static_params.items()
        }
        self.extreme_weights = list(self.mapping.extreme_weights()) if extremes else []
        self.head_cache = {
            ((w,), c): self._merged_head(self.store.merge(w), c) for w in self.extreme_weights for c in sets
        }
        """Merged models' heads by (weights, class set): the λ extremes', computed once."""
        self.interpolants: list[HeadInterpolant | None] = [None] * len(sets)
        interpolated = self.merge_text and self.head_mode == "interpolated"
        fixed = "fixed (merge_text false)" if self.text_changed else "fixed (no expert changes the text tower)"
        self.head_summary: dict = {"mode": self.head_mode if self.merge_text else fixed}
        if interpolated and weight_range is not None:
            scales = [
                self.store.pretrained.logit_scale,
                *(self.store.expert_model(k).logit_scale for k in range(self.count)),
            ]
            scale = float(torch.stack([s.detach().reshape(()) for s in scales]).max().exp())
            head_at = [partial(self._float32_heads, class_set=c) for c in sets]
            tolerance, count = self.head_tolerance, self.count
            fits = [fit_head_interpolant(head_at[c], *weight_range, tolerance, scale, experts=count) for c in sets]
            self.interpolants = [interpolant for interpolant, _ in fits]
            self.head_summary["class_sets"] = [summary for _, summary in fits]
        return path

    def _per_sample_pass(self) -> LeafWisePass | None:
        """The exact per-sample pass for this model, on the store's device, checked on a seeded probe against
        per-sample merges (None, with the reason, if it fails)."""
        store, experts = self.store, range(self.count)
        lora = [store.updates(k) if store.adapters[k] is not None else [] for k in experts]
        dense = [store.changed(k) for k in experts]
        every_full = store.full_rows == list(experts)
        stacked = {name: store.stacked(name) for name in set().union(*dense)} if every_full else None
        vectorized = LeafWisePass(store.pretrained, dense, lora, stacked)
        try:
            error = self._probe_error(vectorized)
        except RuntimeError as err:  # the model's code cannot take per-row parameters
            error, failure = math.inf, f" ({err})"
        else:
            failure = ""
        if error > PROBE_TOLERANCE:
            self.unsupported_reason = f"the leaf-wise pass is {error:.1e} from per-sample merges on a probe{failure}"
            if self.samplewise == "vectorized":
                raise InputError(f"model.samplewise=vectorized cannot run this model: {self.unsupported_reason}")
            return None
        return vectorized

    def _probe_error(self, vectorized: LeafWisePass) -> float:
        """The largest difference of image embeddings (and text embeddings, with merged text towers) between
        ``vectorized`` and per-sample merges, on three seeded images and prompts, each row with its own weight, in the
        models' dtype without autocast."""
        device = self.store.pt_flat.device
        size = image_side(self.store.pretrained.visual.image_size)
        dtype = self.store.pt_flat.dtype  # the models' own (16-true, bf16-true: the probe runs in theirs)
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        tokens = self._tokens(0, self.merged_context)[:3]
        rows = torch.tensor([1.0, 0.37, 0.0])[: len(tokens)]  # the experts' weights differ per row and expert
        weights = torch.stack([rows.roll(k) for k in range(self.count)], dim=-1).to(device)
        inputs = {"encode_image": images[: len(weights)], **({"encode_text": tokens} if self.merge_text else {})}
        with torch.autocast(device.type, enabled=False):
            ours = {encode: getattr(vectorized, encode)(rows, weights) for encode, rows in inputs.items()}
            error = 0.0
            for i, w in enumerate(weights.tolist()):
                merged = self.store.merge(w)  # one merge per weight, both towers compared on it
                for encode, rows in inputs.items():
                    reference = getattr(merged, encode)(rows[i : i + 1], normalize=True)[0]
                    error = max(error, float((ours[encode][i] - reference).abs().max()))
        return error

    def weight_range(self, methods: Iterable[Method]) -> tuple[float, float] | None:
        """The range each expert's weight can take in ``methods`` (the dynamic ones), a little wider for float32
        rounding of λ: what the heads are interpolated over (``prepare``; with several experts, the box of that
        range in every dimension)."""
        ratios = (0.0, 1.0) if self.count == 1 else (0.0, DAWIN_MTL_BUDGET * self.count)  # DaWin's, DaWin-MTL's
        ranges = [
            self.k_experts.box(*self.settings[m.setting].weight_range(), self.count)
            if m.weight_source == "t3"
            else ratios
            for m in methods
            if m.weight_source is not None
        ]
        if not ranges:
            return None
        return min(low for low, _ in ranges) - 1e-6, max(high for _, high in ranges) + 1e-6

    def samplewise_summary(self) -> dict:
        """Which per-sample path ``prepare`` chose: the pass that runs it, or why the loop does (results.json)."""
        if self.path == "vectorized":
            return {"path": "vectorized", "pass": self.pass_name}
        asked = "model.samplewise=loop" if self.samplewise == "loop" else "exact heads on CPU"
        reason = self.unsupported_reason or asked
        return {"path": "loop", "reason": reason}

    def _float32_heads(self, points: list[tuple[float, ...]], class_set: int) -> torch.Tensor:
        """Direct heads (points, classes, dim) of the text towers merged at ``points`` (weight vectors), in float32
        even under mixed precision (the interpolant's tolerance is about interpolation, not bf16 rounding): in one
        batched per-sample text pass where the model runs one, else one merge and text pass each."""
        with torch.autocast(self.store.pt_flat.device.type, enabled=False):
            if self.vectorized is not None:
                weights = torch.tensor(points, dtype=self.store.pt_flat.dtype, device=self.store.pt_flat.device)
                tokens, count = self._tokens(class_set, self.merged_context), self.class_counts[class_set]
                return self.vectorized.zero_shot_heads(tokens, weights, count).float()
            return torch.stack(
                [self._head(self.store.merge(w), class_set, self.merged_context).float() for w in points]
            )

    def _compiled(self, function: Callable) -> Callable:
        """``function`` through torch.compile when asked for; dynamic shapes, as batch sizes vary (last batch,
        per-sample loop)."""
        return torch.compile(function, dynamic=True) if self.compile else function

    def _tokens(self, class_set: int, context: bool = False) -> torch.Tensor:
        """A class set's template prompts, or (``context``) its context prompts."""
        return getattr(self, f"{'context' if context else 'prompt'}_tokens_{class_set}")

    def _head(self, model: nn.Module, class_set: int, context: bool = False) -> torch.Tensor:
        return self.text_head(model, self._tokens(class_set, context), self.class_counts[class_set])

    def _own_head(self, model: nn.Module, class_set: int) -> torch.Tensor:
        """A model's own head: its learned context's where it has one of its own, else its templates'."""
        return self._head(model, class_set, uses_own_context(model))

    def _merged_head(self, model: nn.Module, class_set: int) -> torch.Tensor:
        """A merged model's zero-shot head: its own text tower's, or the pretrained one's without merge_text."""
        if not self.merge_text:
            return self.pt_heads[class_set]
        return self._head(model, class_set, self.merged_context)

    # ------------------------------------------------------------------ logits
    @torch.no_grad()
    def coefficients(self, images: torch.Tensor, class_set: int) -> BatchCoefficients:
        """The pretrained and expert logits (one forward each, shared by every method and setting), JS, and λ and w
        of every T³ setting."""
        pt_logits = self.image_logits(self.store.pretrained, images, self.pt_heads[class_set])
        ft_logits = torch.stack(  # one expert at a time: a LoRA expert's model is the working one, written for it
            [
                self.image_logits(self.store.expert_model(k), images, heads[class_set])
                for k, heads in enumerate(self.expert_heads)
            ]
        )
        # A sample whose logits are not finite gets JS = 0 (the middle of the λ range) rather than NaN,
        # which would poison every merge it takes part in; such samples are counted and reported.
        finite = torch.isfinite(pt_logits).all(-1) & torch.isfinite(ft_logits).all(-1).all(0)
        js = torch.stack([torch.where(finite, self.mapping.js(pt_logits, ft), 0.0) for ft in ft_logits], dim=-1)
        lambdas = {label: mapping.lambdas(js) for label, mapping in self.settings.items()}
        weights = {
            label: self.k_experts.combine(self.settings[label].expert_weights(lam), ft_logits)
            for label, lam in lambdas.items()
        }
        spread = torch.where(finite, generalised_js([pt_logits, *ft_logits]), 0.0) if self.count > 1 else None
        return BatchCoefficients(pt_logits, ft_logits, finite, js, lambdas, weights, spread)

    def context(
        self,
        images: torch.Tensor,
        batch: BatchCoefficients,
        class_set: int,
        setting: str = "",
        batch_weights: torch.Tensor | None = None,
    ) -> BatchContext:
        """What every method's ``predict`` receives for this batch, with the T³ weights of ``setting``;
        ``batch_weights``: those of the whole batch where these rows are a part of it (a mixed split's group)."""
        weights = batch.weights[setting]
        return BatchContext(
            images,
            batch.pt_logits,
            batch.ft_logits,
            weights,
            partial(self.merged_logits, class_set=class_set),
            partial(self.sample_merged_logits, class_set=class_set),
            partial(self.static_logits, class_set=class_set),
            weights if batch_weights is None else batch_weights,
        )

    @torch.no_grad()
    def merged_logits(self, images: torch.Tensor, weights: float | torch.Tensor, class_set: int = 0) -> torch.Tensor:
        """Logits of the model merged with ``weights``, one per expert (one expert's: a number)."""
        model = self.store.merge(weights)
        return self.image_logits(model, images, self._head_at(model, self.store.weight, class_set))

    def _head_at(self, model: nn.Module, weights: tuple[float, ...], class_set: int) -> torch.Tensor:
        """The merged model's head: computed once already, interpolated, or (outside the interpolant) direct (not
        kept: per-sample weights rarely repeat, and a kept head per sample would grow with the split)."""
        head = self.head_cache.get((weights, class_set))
        if head is not None:
            return head
        interpolant = self.interpolants[class_set]
        if interpolant is not None and interpolant.covers(weights):
            return interpolant(torch.tensor([weights]))[0]
        return self._merged_head(model, class_set)

    def set_adapted(self, name: str, flat: torch.Tensor) -> None:
        """An adapted method's merged model (AdaMerging's, for the split about to be evaluated): its image tower
        merged, classified by the generalist's zero-shot heads."""
        self.static_params[name], self.static_heads[name] = flat, self.pt_heads

    @torch.no_grad()
    def static_logits(self, images: torch.Tensor, name: str, class_set: int = 0) -> torch.Tensor:
        """Logits of the static method ``name``'s merged model (built once, in ``prepare``)."""
        return self.image_logits(self.store.load(self.static_params[name]), images, self.static_heads[name][class_set])

    @torch.no_grad()
    def sample_merged_logits(self, images: torch.Tensor, weights: torch.Tensor, class_set: int = 0) -> torch.Tensor:
        """Logits where sample i runs through the model merged with ``weights[i]`` (rows × experts; one expert's: a
        vector of rows), exactly."""
        weights = weights.unsqueeze(-1) if weights.ndim == 1 else weights
        if self.path == "loop":
            return self.grouped_logits(images, weights, class_set)
        fixed_head = None if self.merge_text else self.pt_heads[class_set]
        interpolant = self.interpolants[class_set]
        row_heads = None
        covered = interpolant is not None and all(interpolant.covers(w) for w in weights.tolist())
        if fixed_head is None and covered:
            row_heads = interpolant(weights)
        tokens, count = self._tokens(class_set, self.merged_context), self.class_counts[class_set]
        return self.vectorized_logits(images, weights, tokens, count, fixed_head, row_heads)

    def grouped_logits(self, images: torch.Tensor, weights: torch.Tensor, class_set: int = 0) -> torch.Tensor:
        """Like ``sample_merged_logits``, by one fused merge per distinct weight vector: the loop path, and the
        clustered methods' second pass (a few components, so a few merges)."""
        weights = weights.unsqueeze(-1) if weights.ndim == 1 else weights
        return per_sample_loop(partial(self.merged_logits, class_set=class_set), images, weights)

    def extreme_predictions(self, images: torch.Tensor, class_set: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Predicted classes of the models at λ_min and λ_max (None unless ``prepare`` was asked for them)."""
        if not self.extreme_weights:
            return None
        low, high = (self.merged_logits(images, w, class_set).argmax(-1) for w in self.extreme_weights)
        return low, high
