"""Zero-shot accuracy through lm-evaluation-harness's own task machinery, on local files.

aird writes lm-eval task configs that point at the JSONL files of the data directory or of the copy bundled with
aird (the llm-foundry preprocessed copies of ARC, PIQA, OpenBookQA, BoolQ, WinoGrande, HellaSwag, and SuperGLUE
RTE; see ``aird.core.data.CATALOGUE``), with the
prompts lm-eval's own tasks use, and passes the already-loaded model to lm-eval (HFLM). acc and acc_norm are
therefore lm-eval's definitions, not aird's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aird.core.data import find_file
from aird.core.errors import AirdError
from aird.core.loading import LoadedModel


@dataclass(frozen=True)
class ZeroShotTask:
    name: str                       # also the task's entry in the data catalogue
    text: str
    choice: str
    target: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")


QA = "{{query.strip()}}\nAnswer:"
TASKS: dict[str, ZeroShotTask] = {t.name: t for t in (
    ZeroShotTask("arc_easy", QA, "{{choices}}", "{{gold}}"),
    ZeroShotTask("arc_challenge", QA, "{{choices}}", "{{gold}}"),
    ZeroShotTask("hellaswag", "{{query}}", "{{endings}}", "{{label}}"),
    ZeroShotTask("piqa", QA, "{{choices}}", "{{gold}}"),
    ZeroShotTask("boolq", QA, "{{choices}}", "{{gold}}", ("acc",)),
    ZeroShotTask("winogrande", "!function utils.wino_text", "!function utils.wino_choice",
                 "!function utils.wino_target", ("acc",)),
    ZeroShotTask("openbookqa", "{{query}}", "{{choices}}", "{{gold}}"),
    ZeroShotTask("rte", "{{premise}}\nQuestion: {{hypothesis}} True or False?\nAnswer:",
                 '["True", "False"]', "{{0 if label == 'entailment' else 1}}", ("acc",)),
)}
# every task aird knows, in its order: the default of `aird eval --task` and of a study's [eval] tasks
ZERO_SHOT_TASKS: tuple[str, ...] = tuple(TASKS)

# WinoGrande is scored by partial evaluation, as in lm-eval: the choices are the two contexts (sentence up to
# the blank, filled with each option) and the target is the continuation after the blank.
UTILS = '''def wino_text(doc):
    return int(doc["gold"])


def wino_target(doc):
    return doc["continuation"]


def wino_choice(doc):
    return list(doc["context_options"])
'''


def _yaml_value(v: str) -> str:
    if v.startswith("!function") or v.startswith("["):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_task_configs(folder: Path, tasks: list[str], data_dir: str | None) -> list[str]:
    """lm-eval task YAMLs (names prefixed aird_) pointing at the local files; returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS)
    names = []
    for name in tasks:
        t = TASKS.get(name)
        if t is None:
            raise AirdError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}.")
        path = find_file(name, data_dir).path      # lm-eval's JSON loader reads .gz files as they are
        metrics = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in t.metrics)
        (folder / f"aird_{name}.yaml").write_text(
            f"task: aird_{name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {path}\n"
            f"test_split: test\n"
            f"output_type: multiple_choice\n"
            f"doc_to_text: {_yaml_value(t.text)}\n"
            f"doc_to_choice: {_yaml_value(t.choice)}\n"
            f"doc_to_target: {_yaml_value(t.target)}\n"
            f"metric_list:\n{metrics}\n"
        )
        names.append(f"aird_{name}")
    return names


def prefix_sharing_lm(model, tokenizer, batch_size: int, device: str):
    """lm-eval's HFLM whose log-likelihoods share each context across its continuations.

    Multiple-choice tasks ask for log P(continuation | context) of every answer choice after the same context;
    HFLM runs context + choice once per choice, with full-vocabulary logits at every position. This runs each
    distinct context once (last-position logits only) and then all its continuations together from the context's
    KV cache, with logits at the continuation positions only: the same numbers (a test checks them against HFLM
    to 1e-4) for a fraction of the work. Contexts longer than the model's window fall back to HFLM's path."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class PrefixSharingLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            out: list = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            fallback = []
            for i, (_, ctx, cont) in enumerate(requests):
                if len(ctx) + len(cont) > self.max_length or not ctx or not cont:
                    fallback.append(i)
                else:
                    groups.setdefault(tuple(ctx), []).append(i)
            if fallback:
                for i, r in zip(fallback, super()._loglikelihood_tokens([requests[i] for i in fallback],
                                                                         disable_tqdm=True, override_bs=override_bs)):
                    out[i] = r
            net = self.model
            dev = self.device
            with torch.inference_mode():
                for ctx, idx in groups.items():
                    conts = [list(requests[i][2]) for i in idx]
                    ids = torch.tensor([list(ctx)], device=dev)
                    first = net(input_ids=ids, use_cache=True, logits_to_keep=1)
                    lp0 = torch.log_softmax(first.logits[0, -1].float(), -1)
                    longest = max(len(c) for c in conts)
                    rest = None
                    if longest > 1:
                        k = len(conts)
                        cache = first.past_key_values
                        if k > 1:
                            cache.batch_repeat_interleave(k)
                        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                        inp = torch.full((k, longest - 1), pad, dtype=torch.long, device=dev)
                        mask = torch.zeros((k, len(ctx) + longest - 1), dtype=torch.long, device=dev)
                        mask[:, : len(ctx)] = 1
                        for j, c in enumerate(conts):
                            inp[j, : len(c) - 1] = torch.tensor(c[:-1])
                            mask[j, len(ctx): len(ctx) + len(c) - 1] = 1
                        pos = torch.arange(len(ctx), len(ctx) + longest - 1, device=dev).expand(k, -1)
                        rest = torch.log_softmax(net(input_ids=inp, attention_mask=mask, position_ids=pos,
                                                     past_key_values=cache, use_cache=False).logits.float(), -1)
                    for j, (i, c) in enumerate(zip(idx, conts)):
                        rows = [lp0] + ([rest[j, t] for t in range(len(c) - 1)] if rest is not None else [])
                        total = sum(float(row[tok]) for row, tok in zip(rows, c))
                        greedy = all(int(row.argmax()) == tok for row, tok in zip(rows, c))
                        out[i] = (total, greedy)
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
            return out

    return PrefixSharingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def run_zero_shot(lm: LoadedModel, tasks: list[str], folder: Path, data_dir: str | None, limit: int | None,
                  batch_size: int = 8, model_for_lm_eval=None, share_prefix: bool = True) -> dict[str, dict]:
    """Accuracy per task: {task: {"acc": .., "acc_norm": .., "n": .., "items": ..}}, ``items`` each question's
    correctness in question order as a string of 0/1 per metric ({"acc": "0110…", "acc_norm": "…"}), so two
    models' answers to the same questions can be compared pairwise. ``model_for_lm_eval`` replaces the
    loaded model with what lm-eval should load itself (a path), for checking aird against lm-eval direct."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AirdError("the zero-shot tasks need lm-evaluation-harness: pip install 'aird[eval]'.") from None
    names = write_task_configs(folder, tasks, data_dir)
    if model_for_lm_eval is None and share_prefix:
        model = prefix_sharing_lm(lm.model, lm.tokenizer, batch_size, str(lm.device))
    elif model_for_lm_eval is None:     # lm-eval's own HFLM on the loaded model (bench/bench_zeroshot.py)
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, device=str(lm.device))
    else:
        model = HFLM(pretrained=str(model_for_lm_eval), tokenizer=lm.tokenizer, batch_size=batch_size, device="cpu")
    res = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=0, limit=limit,
                                  task_manager=TaskManager(include_path=str(folder)), log_samples=True,
                                  bootstrap_iters=0)
    out = {}
    for name, task in zip(tasks, names):
        r = res["results"][task]
        out[name] = {m: r.get(f"{m},none") for m in TASKS[name].metrics}
        out[name]["n"] = res.get("n-samples", {}).get(task, {}).get("effective")
        samples = sorted(res.get("samples", {}).get(task, []), key=lambda x: x["doc_id"])
        out[name]["items"] = {m: "".join("1" if float(x.get(m, 0)) > 0.5 else "0" for x in samples)
                              for m in TASKS[name].metrics if samples and m in samples[0]}
    return out
