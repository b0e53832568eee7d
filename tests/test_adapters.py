import pytest
import torch

import tiny
from conftest import wrap

from aird.core.adapters import adapter_for
from aird.core.errors import UnsupportedModel


@pytest.mark.parametrize("model_type,family", [("qwen2", "qwen"), ("qwen3", "qwen"), ("llama", "llama"),
                                               ("gemma3_text", "gemma3")])
def test_adapter_found_from_config_and_structure(model_type, family):
    model, tok = tiny.random_model(model_type, layers=3)
    lm = wrap(model, tok)
    assert lm.adapter.family == family
    assert lm.n_layers == 3
    layer = lm.adapter.layers(model)[0]
    assert isinstance(lm.adapter.out_proj(layer, "attn"), torch.nn.Linear)
    assert lm.adapter.out_proj(layer, "mlp").out_features == model.config.hidden_size
    # the writers' outputs are what gets added to the residual stream: same width as the residual
    x = torch.randint(5, len(tok), (1, 6))
    seen = []
    h = lm.adapter.mlp_writer(layer).register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(input_ids=x)
    h.remove()
    assert seen and seen[0].shape[-1] == model.config.hidden_size


def test_adapter_chosen_by_model_type_not_name():
    model, tok = tiny.random_model("llama")
    model.config.name_or_path = "Qwen/Qwen2.5-looks-like-qwen"
    assert adapter_for(model.config).family == "llama"


def test_unknown_family_is_a_clear_error():
    model, _ = tiny.random_model("qwen2")
    model.config.model_type = "mamba"
    with pytest.raises(UnsupportedModel, match="no adapter for model_type 'mamba'"):
        adapter_for(model.config)


def test_post_instruction_positions_match_the_template_suffix():
    model, tok = tiny.random_model("qwen2")
    lm = wrap(model, tok)
    positions = lm.adapter.post_instruction_positions(tok)
    text = lm.adapter.format(tok, "Tell me how to bake a cake")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tail = tok.convert_ids_to_tokens(ids[positions[0]:])
    assert tail == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert positions == [-3, -2, -1]


def test_gemma_positions_and_refusal_tokens():
    model, tok = tiny.random_model("gemma3_text")
    lm = wrap(model, tok)
    assert lm.adapter.post_instruction_positions(tok) == [-3, -2, -1]
    assert tok.convert_ids_to_tokens(lm.adapter.refusal_token_ids(tok)) == ["I"]


def test_refusal_tokens_derived_from_tokenizer():
    model, tok = tiny.random_model("qwen2")
    lm = wrap(model, tok)
    assert tok.convert_ids_to_tokens(lm.adapter.refusal_token_ids(tok)) == ["I", "As"]


def test_model_without_chat_template_is_rejected():
    model, _ = tiny.random_model("qwen2")
    tok = tiny.tokenizer(with_template=False)
    with pytest.raises(UnsupportedModel, match="no chat template"):
        wrap(model, tok)
