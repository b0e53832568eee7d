"""One adapter per model family, chosen from ``config.model_type`` (never from a model's name).

An adapter knows where a family keeps its decoder layers, which modules write to the residual stream, how
to find the post-instruction tokens of its chat template and which tokens start its refusals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aird.core.errors import AirdError, UnsupportedModel

PLACEHOLDER = "\u2063AIRD_INSTRUCTION\u2063"


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    refusal_prefixes: tuple[str, ...] = ("I",)
    # True when the attention/MLP output projections write straight into the residual stream. Gemma 3 puts
    # an RMSNorm with learned weights after them, so an edit of o_proj/down_proj is not an edit of what
    # reaches the residual; interventions there hook the norms' outputs instead.
    projections_write_residual: bool = True
    attn_writer_name: str = "self_attn"
    mlp_writer_name: str = "mlp"

    # ---- structure -------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        inner = model.model
        return getattr(inner, "language_model", inner)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def linears(self, model: nn.Module):
        """Every Linear inside the decoder layers: (layer index, name within the layer, module)."""
        for i, layer in enumerate(self.layers(model)):
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    yield i, name, mod

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def embedding(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def attn_writer(self, layer: nn.Module) -> nn.Module:
        """The module whose output is added to the residual stream by the attention block."""
        return getattr(layer, self.attn_writer_name)

    def mlp_writer(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_writer_name)

    def out_proj(self, layer: nn.Module, which: str) -> nn.Linear:
        """The residual-writing matrix of a block: 'attn' (o_proj) or 'mlp' (down_proj)."""
        if which == "attn":
            return layer.self_attn.o_proj
        if which == "mlp":
            return layer.mlp.down_proj
        raise AirdError(f"unknown matrix {which!r}; use attn or mlp.")

    # ---- prompts ---------------------------------------------------------------------------------
    def format(self, tokenizer, instruction: str, system: str | None = None) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise UnsupportedModel("the model's tokenizer has no chat template; aird needs a chat (instruct) model.")
        # system=None keeps the template's own default (Qwen adds one); "" asks for an empty system turn
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def post_instruction_suffix(self, tokenizer, system: str | None = None) -> str:
        """The text the chat template puts after the user's instruction, up to where the reply starts."""
        text = self.format(tokenizer, PLACEHOLDER, system)
        if text.count(PLACEHOLDER) != 1:
            raise UnsupportedModel("the chat template does not place the instruction exactly once.")
        return text.split(PLACEHOLDER, 1)[1]

    def post_instruction_positions(self, tokenizer, system: str | None = None) -> list[int]:
        """Negative positions of the post-instruction tokens, e.g. [-5, -4, -3, -2, -1]."""
        suffix = self.post_instruction_suffix(tokenizer, system)
        probe = self.format(tokenizer, "Tell me a joke.", system)
        full = tokenizer(probe, add_special_tokens=False)["input_ids"]
        suf = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if not suf or full[-len(suf):] != suf:
            raise UnsupportedModel("the post-instruction tokens of the chat template do not tokenize on their own.")
        return list(range(-len(suf), 0))

    def refusal_token_ids(self, tokenizer) -> list[int]:
        """First token of each refusal prefix ("I", "As", ...), as the reply's first token would be."""
        ids = []
        for prefix in self.refusal_prefixes:
            toks = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            if toks and toks[0] not in ids:
                ids.append(toks[0])
        if not ids:
            raise UnsupportedModel("none of the refusal prefixes tokenize with this tokenizer.")
        return ids


QWEN = Adapter(family="qwen", model_types=("qwen2", "qwen3"), refusal_prefixes=("I", "As"))
LLAMA = Adapter(family="llama", model_types=("llama", "mistral"), refusal_prefixes=("I", "As"))
GEMMA3 = Adapter(
    family="gemma3",
    model_types=("gemma3", "gemma3_text"),
    refusal_prefixes=("I",),
    projections_write_residual=False,
    attn_writer_name="post_attention_layernorm",
    mlp_writer_name="post_feedforward_layernorm",
)

ADAPTERS: tuple[Adapter, ...] = (QWEN, LLAMA, GEMMA3)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UnsupportedModel(
        f"aird has no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}."
    )


def residual_dim(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
