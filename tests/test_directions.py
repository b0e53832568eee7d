import copy

import torch

import tiny
from conftest import wrap

from aird.core import hooks
from aird.core.directions import cosine, diff_in_means, kl_div, orthogonalize_weights, refusal_scores
from aird.core.forward import last_logits, make_batches


def _batches(lm, n=6):
    texts = [lm.adapter.format(lm.tokenizer, t) for t in tiny.instructions(tiny.HARMLESS_ACTS)[:n]]
    return make_batches(lm, texts, 4)


def test_diff_in_means():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    assert torch.allclose(diff_in_means(a, b), torch.tensor([2.0, 1.0]))


def test_refusal_score_is_log_odds_of_refusal_mass():
    logits = torch.randn(3, 10)
    ids = [2, 5]
    p = logits.softmax(-1)[:, ids].sum(-1).double()
    expected = (p.log() - (1 - p).log()).float()
    assert torch.allclose(refusal_scores(logits, ids), expected, atol=1e-5)


def test_kl_zero_for_same_and_positive_for_different():
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    assert torch.allclose(kl_div(a, a), torch.zeros(4), atol=1e-7)
    assert (kl_div(a, b) > 0).all()


def test_cosine():
    assert abs(cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])).item() - 1) < 1e-6
    assert abs(cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])).item()) < 1e-6


def test_ablation_removes_exactly_the_component():
    model, tok = tiny.random_model("qwen2")
    lm = wrap(model, tok)
    r = torch.randn(model.config.hidden_size)
    rhat = r / r.norm()
    batches = _batches(lm)
    clean, ablated = {}, {}
    with torch.inference_mode():
        with hooks.capture_resid(lm, clean, None):
            lm.model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)
        with hooks.ablate(lm, r), hooks.capture_resid(lm, ablated, None):
            lm.model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)
    # layer 0's input is the embedding: ablation removes exactly its projection on r̂ and nothing else
    expected0 = clean[0] - (clean[0] @ rhat).unsqueeze(-1) * rhat
    assert torch.allclose(ablated[0], expected0, atol=1e-5)
    for i in range(lm.n_layers):
        # the capture hook runs after the ablation pre-hook: no layer input keeps any component along r̂
        assert (ablated[i] @ rhat).abs().max() < 1e-4


def test_weight_orthogonalization_matches_activation_ablation():
    for tie in (False, True):
        model, tok = tiny.random_model("qwen2", tie=tie)
        lm = wrap(model, tok)
        r = torch.randn(model.config.hidden_size)
        batches = _batches(lm)
        with hooks.ablate(lm, r):
            hooked = last_logits(lm, batches)
        clean = last_logits(lm, batches)
        edited = wrap(copy.deepcopy(model), tok)
        orthogonalize_weights(edited, r)
        baked = last_logits(edited, batches)
        assert not torch.allclose(hooked, clean, atol=1e-3)
        assert torch.allclose(baked, hooked, atol=1e-4), (tie, (baked - hooked).abs().max())
        # the unembedding is untouched even when it was tied to the embedding
        assert torch.equal(edited.model.lm_head.weight, model.lm_head.weight)


def test_activation_addition_changes_only_from_its_layer():
    model, tok = tiny.random_model("llama")
    lm = wrap(model, tok)
    r = torch.randn(model.config.hidden_size)
    b = _batches(lm)[0]
    clean, steered = {}, {}
    with torch.inference_mode():
        with hooks.capture_resid(lm, clean, None):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        with hooks.add(lm, r, layer=2), hooks.capture_resid(lm, steered, None):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    assert torch.allclose(clean[1], steered[1]) and torch.allclose(clean[0], steered[0])
    assert not torch.allclose(clean[3], steered[3])


def test_start_at_cached_layer_matches_full_forward():
    for model_type in ("qwen2", "gemma3_text"):
        model, tok = tiny.random_model(model_type)
        lm = wrap(model, tok)
        b = _batches(lm)[0]
        r = torch.randn(model.config.hidden_size)
        cache = {}
        with torch.inference_mode(), hooks.capture_resid(lm, cache, None):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        with hooks.add(lm, r, layer=2):
            full = last_logits(lm, [b])
        with hooks.start_at(lm, 2, cache[2] + r):
            fast = last_logits(lm, [b])
        assert torch.allclose(full, fast, atol=1e-4), model_type
        # the skipped layers are put back
        assert all(type(layer).__name__.endswith("DecoderLayer") for layer in lm.adapter.layers(model))


def test_left_padding_gives_the_same_logits_as_no_padding():
    model, tok = tiny.random_model("qwen2")
    lm = wrap(model, tok)
    texts = [lm.adapter.format(tok, "Tell me how to bake a cake"), lm.adapter.format(tok, "What is the best way to fix a bike")]
    together = last_logits(lm, make_batches(lm, texts, 2))
    alone = torch.cat([last_logits(lm, make_batches(lm, [t], 1)) for t in texts])
    assert torch.allclose(together, alone, atol=1e-4)
