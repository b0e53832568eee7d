"""Zero-shot tasks through lm-eval on local files: aird's wrapper (the loaded model handed to lm-eval) agrees
with lm-eval loading the same model itself, and with log-likelihoods computed by hand."""

import json
from pathlib import Path

import pytest
import torch

import tiny
from aird.core.loading import load_model
from aird.core.zeroshot import TASKS, run_zero_shot, write_task_configs

pytest.importorskip("lm_eval")


def _tiny_tasks(data):
    qs = tiny.instructions(tiny.HARMLESS_ACTS)[:12]
    arc = [{"query": f"Question: {q}?", "choices": ["Sure", "I", "a way"], "gold": i % 3} for i, q in enumerate(qs)]
    (data / "arc_easy").mkdir(exist_ok=True)
    (data / "arc_easy" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    wino = [{"context_options": [f"Tell me how to {a}", f"Explain how to {a}"], "continuation": "is the best way",
             "gold": i % 2} for i, a in enumerate(tiny.HARMLESS_ACTS[:8])]
    (data / "winogrande").mkdir(exist_ok=True)
    (data / "winogrande" / "winogrande.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wino))
    return arc, wino


def test_bundled_task_files_run_through_lm_eval(refusing, tmp_path, monkeypatch):
    """With no data directory every task's YAML points at the gzip file bundled with aird, and lm-eval reads it."""
    from aird.core.data import PACKAGE_DATA

    monkeypatch.delenv("AIRD_DATA_DIR", raising=False)
    names = write_task_configs(tmp_path / "all", list(TASKS), None)
    assert len(set(names)) == len(TASKS)
    for name in names:   # every task reads a file that ships with aird and is not empty
        text = (tmp_path / "all" / f"{name}.yaml").read_text()
        path = Path(next(line.split(":", 1)[1].strip() for line in text.splitlines()
                         if line.strip().startswith("test:")))
        assert path.is_relative_to(PACKAGE_DATA) and path.is_file() and path.stat().st_size > 100, name
    lm = load_model(str(refusing[0]), device="cpu")
    res = run_zero_shot(lm, ["rte", "boolq"], tmp_path / "run", None, limit=4)
    assert res["rte"]["n"] == 4 and res["boolq"]["n"] == 4
    assert 0 <= res["rte"]["acc"] <= 1 and 0 <= res["boolq"]["acc"] <= 1


def test_aird_zero_shot_equals_lm_eval_direct_and_hand_computation(refusing, tmp_path):
    model_dir, data = refusing
    arc, wino = _tiny_tasks(data)
    lm = load_model(str(model_dir), device="cpu")
    ours = run_zero_shot(lm, ["arc_easy", "winogrande"], tmp_path / "t1", str(data), limit=None)
    direct = run_zero_shot(lm, ["arc_easy", "winogrande"], tmp_path / "t2", str(data), limit=None,
                           model_for_lm_eval=model_dir)
    assert ours == direct
    assert ours["arc_easy"]["n"] == 12
    # an lm-eval model object scores in place of the loaded model (how the bench runs lm-eval's vLLM backend)
    from lm_eval.models.huggingface import HFLM

    given = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4, device="cpu")
    assert run_zero_shot(lm, ["arc_easy", "winogrande"], tmp_path / "t3", str(data), limit=None,
                         model_for_lm_eval=given) == ours

    # by hand: the choice with the highest summed log-likelihood after "query\nAnswer:" + " " + choice
    tok = lm.tokenizer

    def loglik(context, continuation):
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        full = tok(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([full])).logits[0].double(), -1)
        return sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))

    correct = [max(range(3), key=lambda c: loglik(f"{r['query']}\nAnswer:", " " + r["choices"][c])) == r["gold"]
               for r in arc]
    assert ours["arc_easy"]["acc"] == pytest.approx(sum(correct) / len(correct))
    wcorrect = [max(range(2), key=lambda c: loglik(r["context_options"][c], " " + r["continuation"])) == r["gold"]
                for r in wino]
    assert ours["winogrande"]["acc"] == pytest.approx(sum(wcorrect) / len(wcorrect))


def test_prefix_sharing_gives_hflms_log_likelihoods(refusing):
    """Each context run once and its continuations from its KV cache: the same log-likelihoods and greedy flags as
    lm-eval's HFLM, for one-token and longer continuations, several per context and contexts of other lengths."""
    from lm_eval.models.huggingface import HFLM

    from aird.core.zeroshot import packed_loglikelihoods, prefix_sharing_lm

    lm = load_model(str(refusing[0]), device="cpu")
    tok = lm.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    reqs = []
    for q in tiny.instructions(tiny.HARMLESS_ACTS)[:5]:
        ctx = enc(f"Question: {q}?\nAnswer:")
        for c in (" Sure", " I cannot help with that", " a way to do it step by step"):
            reqs.append(((q, c), ctx, enc(c)))
    # a context with two one-token choices and one with a single choice: groups of every size share a batch
    for q, conts in (("Is water wet", (" Yes", " No")), ("Name a colour", (" blue",))):
        for c in conts:
            reqs.append(((q, c), enc(f"Question: {q}?\nAnswer:"), enc(c)))
    ours = prefix_sharing_lm(lm.model, tok, 4, "cpu")._loglikelihood_tokens(reqs)
    ref = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=4, device="cpu")._loglikelihood_tokens(reqs)
    assert len(ours) == len(ref) == 18
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # rows packed a few at a time (small batches, padding in each) give the same numbers
    groups: dict = {}
    for i, (_, ctx, cont) in enumerate(reqs):
        groups.setdefault(tuple(ctx), []).append(i)
    small = packed_loglikelihoods(lm.model, [(list(k), [reqs[i][2] for i in v]) for k, v in groups.items()],
                                  pad_id=0, max_tokens=40)
    flat = [r for res in small for r in res]
    order = [i for v in groups.values() for i in v]
    for (a, ga), i in zip(flat, order):
        assert a == pytest.approx(ref[i][0], abs=1e-4) and ga == ref[i][1]


def test_missing_task_file_is_a_clear_error(tmp_path, monkeypatch):
    from aird.core import data
    from aird.core.errors import AirdError

    monkeypatch.setattr(data, "PACKAGE_DATA", tmp_path / "no-bundle")
    with pytest.raises(AirdError, match="data set 'boolq' not found: looked at"):
        write_task_configs(tmp_path / "t", ["boolq"], str(tmp_path))
    with pytest.raises(AirdError, match="unknown zero-shot task"):
        write_task_configs(tmp_path / "t", ["mmlu"], str(tmp_path))
