"""Learned prompt contexts (CoOp, and the test-time prompt-tuning family: TPT, C-TPT, DiffTPT, TNT, TTL): a model
whose zero-shot head is [SOS] ctx_1 … ctx_n CLASS . [EOS] rather than a template. The context is a parameter of the
text tower's token embedding (``token_embedding.prompt_context``, shape 1 × n_ctx × width), so merges, the fused
store and the per-sample pass treat it as any other parameter; a forward hook puts it in place of the placeholder
tokens of the context prompts ``X X … X CLASS.`` (the prompt the prompt-learner code builds when it draws its context
at random: its class tokens sit where they sit there), and leaves every other prompt as it is."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tcube_lightning.errors import InputError

CONTEXT = "prompt_context"
"""The context's parameter name on the token embedding."""
PARAMETER = f"token_embedding.{CONTEXT}"
PLACEHOLDER = "X"
"""The word the context prompts hold in the context's places (one token each), as CoOp and TPT write them."""
CONTEXT_INIT = "a photo of a"
"""``model.context_init``'s default: the words TPT (and CoOp's ctx_init) start their context from."""
TEMPLATE_HEAD = "templates"


def context_prompts(classnames: list[str], length: int) -> list[str]:
    """One prompt per class, ``X X … X CLASS.`` with ``length`` placeholders: where the context goes."""
    return [f"{' '.join([PLACEHOLDER] * length)} {name}." for name in classnames]


def context_of(model: nn.Module) -> torch.Tensor | None:
    """A model's learned context (1 × n_ctx × width), or None."""
    embedding = getattr(model, "token_embedding", None)
    return getattr(embedding, CONTEXT, None) if embedding is not None else None


def uses_own_context(model: nn.Module) -> bool:
    """Whether the model's own zero-shot head is its learned-context head (a context that is its own)."""
    return context_of(model) is not None and model.token_embedding.context_own


def give_contexts(
    models: dict[str | None, nn.Module],
    own: dict[str | None, torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    context_init: str = CONTEXT_INIT,
    merge_text: bool = True,
) -> dict[str | None, str]:
    """Where some files carry a learned context (``own``, by model name), every full model of ``models`` (the
    generalist under None, and the full experts by name) gets a context parameter, so that their parameters match and
    merged text towers merge it: its own, else the generalist's (its own, or its token embeddings of
    ``context_init``, what TPT starts from). A model uses its context for its own head only where it is its own;
    merged models (``merge_text``) use the merged one. Returns each model's head, in words (results.json)."""
    if not own:
        return {}
    lengths = {name: int(context.shape[0]) for name, context in own.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"learned prompt contexts of different lengths {lengths}: merged, they need one n_ctx")
    length, generalist = next(iter(lengths.values())), models[None]
    if None in own:
        shared, origin = own[None], "its own learned context"
    else:
        words = embedded_words(generalist, tokenizer, context_init)
        if len(words) == length:
            shared, origin = words, f"its token embeddings of {context_init!r} (model.context_init)"
        elif merge_text:
            raise InputError(
                f"model.context_init: {context_init!r} makes {len(words)} tokens, but the learned context is {length} "
                "long; merged text towers start the generalist's context from those words: give the words the "
                "expert's context was initialised from, or --model.merge_text false (the generalist's head for merges)"
            )
        else:  # never used: merged models take the generalist's head
            shared, origin = embedded_words(generalist, tokenizer, " ".join([PLACEHOLDER] * length)), "unused"
    heads = {}
    for name, model in models.items():
        attach_context(model, own.get(name, shared), tokenizer, own=name in own)
        heads[name] = f"learned context (n_ctx {length})" if name in own else TEMPLATE_HEAD
    if None not in own:
        heads[None] += f"; its context in merged text towers: {origin}"
    return heads


def attach_context(
    model: nn.Module, context: torch.Tensor, tokenizer: Callable[[list[str]], torch.Tensor], own: bool = True
) -> None:
    """Give ``model`` the context (n_ctx × width): a parameter on its token embedding, put in place of the placeholders
    of context prompts by a forward hook (registered once; copies of the model keep it). ``own``: the model's head
    is its learned-context head (else its templates', the context being there for merges)."""
    embedding = getattr(model, "token_embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise InputError(
            f"a learned prompt context needs a CLIP text tower with its own token embedding; {type(model).__name__} "
            "has none (a Hugging Face text tower)"
        )
    if context.ndim != 2 or context.shape[1] != embedding.embedding_dim:
        raise InputError(
            f"a learned prompt context of shape {tuple(context.shape)} does not fit the text tower's width "
            f"{embedding.embedding_dim} (n_ctx × width expected)"
        )
    first = CONTEXT not in embedding._parameters
    value = context.detach().clone().to(embedding.weight.dtype).unsqueeze(0)
    embedding.register_parameter(CONTEXT, nn.Parameter(value, requires_grad=False))
    embedding.context_own = own
    if first:
        embedding.context_placeholder = int(tokenizer([PLACEHOLDER])[0, 1])
        embedding.register_forward_hook(insert_context)


def insert_context(module: nn.Embedding, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The rows of ``output`` whose tokens 1..n_ctx are placeholders take the context there (per row where the context
    is given per row, in the per-sample pass)."""
    context = getattr(module, CONTEXT)
    tokens, length = args[0], context.shape[1]
    rows = (tokens[:, 1 : 1 + length] == module.context_placeholder).all(dim=1)
    if not rows.any():
        return output
    output = output.clone()
    output[rows, 1 : 1 + length] = context.expand(len(output), -1, -1)[rows].to(output.dtype)
    return output


def embedded_words(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], words: str) -> torch.Tensor:
    """The model's own token embeddings of ``words`` (n_tokens × width): the context they make, as a prompt learner
    initialised from them starts."""
    tokens = tokenizer([words])[0]
    end = int(tokens.argmax())  # the end-of-text token has the highest id
    with torch.no_grad():
        return model.token_embedding.weight[tokens[1:end]].detach().clone()
