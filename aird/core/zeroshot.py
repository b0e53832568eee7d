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


PACK_TOKENS = 1024   # tokens per packed forward pass (rows × longest row): where a 2-core CPU stops gaining


def pack_group(ctx: list[int], conts: list[list[int]]):
    """One context and its continuations as one packed row: the context, then each continuation but its last token.

    Returns the row's token ids, position ids, a boolean attention matrix (query × key, True = attends: the context
    is causal, each continuation sees the context and its own earlier tokens only, never another continuation)
    and, per continuation, the row positions whose next-token logits score its tokens (the context's last position
    for the first token, then the continuation's own). The same log-likelihoods as running context + continuation
    once per choice, with the context computed once."""
    import torch

    c = len(ctx)
    ids, pos, owner = list(ctx), list(range(c)), [-1] * c
    reads = []
    for j, cont in enumerate(conts):
        start = len(ids)
        ids += cont[:-1]
        pos += range(c, c + len(cont) - 1)
        owner += [j] * (len(cont) - 1)
        reads.append([c - 1] + list(range(start, start + len(cont) - 1)))
    n = len(ids)
    own = torch.tensor(owner)
    idx = torch.arange(n)
    causal = idx[None, :] <= idx[:, None]
    # a key is visible to a query when it is earlier in the row and either context or the query's own continuation
    visible = causal & ((own[None, :] == -1) | (own[None, :] == own[:, None]))
    return ids, pos, visible, reads


def packed_loglikelihoods(net, groups: list[tuple[list[int], list[list[int]]]], pad_id: int,
                          max_tokens: int = PACK_TOKENS, progress=None) -> list[list[tuple[float, bool]]]:
    """log P(continuation | context) and whether greedy decoding would produce it, for every continuation of every
    (context, continuations) group: groups packed one per row (``pack_group``), rows of similar length batched up
    to ``max_tokens`` (rows × longest row), logits only at the positions that score a token."""
    import torch

    packed = [pack_group(ctx, conts) for ctx, conts in groups]
    order = sorted(range(len(groups)), key=lambda g: len(packed[g][0]))
    batches, cur = [], []
    for g in order:
        if cur and (len(cur) + 1) * len(packed[g][0]) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(g)
    if cur:
        batches.append(cur)
    base = getattr(net, net.base_model_prefix)
    head = net.get_output_embeddings()
    cap = getattr(net.config, "final_logit_softcapping", None)
    dev = next(net.parameters()).device
    out: list = [None] * len(groups)
    with torch.inference_mode():
        for batch in batches:
            width = max(len(packed[g][0]) for g in batch)
            b = len(batch)
            ids = torch.full((b, width), pad_id, dtype=torch.long)
            pos = torch.zeros((b, width), dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1)   # padding attends to itself only
            for r, g in enumerate(batch):
                t, p, v, _ = packed[g]
                ids[r, : len(t)] = torch.tensor(t)
                pos[r, : len(p)] = torch.tensor(p)
                mask[r, : len(t), : len(t)] = v
            hidden = base(input_ids=ids.to(dev), position_ids=pos.to(dev),
                          attention_mask=mask[:, None].to(dev)).last_hidden_state
            for r, g in enumerate(batch):
                reads = packed[g][3]
                at = sorted({i for rd in reads for i in rd})
                logits = head(hidden[r, at]).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                lp = torch.log_softmax(logits, -1)
                row = {i: k for k, i in enumerate(at)}
                res = []
                for rd, cont in zip(reads, groups[g][1]):
                    sel = lp[[row[i] for i in rd]]
                    tok = torch.tensor(cont)
                    total = float(sel.gather(1, tok[:, None].to(sel.device)).sum())
                    greedy = bool((sel.argmax(-1).cpu() == tok).all())
                    res.append((total, greedy))
                out[g] = res
            if progress:
                progress(b)
    return out


def prefix_sharing_lm(model, tokenizer, batch_size: int, device: str):
    """lm-eval's HFLM whose log-likelihoods share each context across its continuations.

    Multiple-choice tasks ask for log P(continuation | context) of every answer choice after the same context;
    HFLM runs context + choice once per choice, with full-vocabulary logits at every position. This packs each
    distinct context and all its continuations into one row (``pack_group``: each continuation attends to the
    context and to itself), batches rows of similar length, and takes logits only at the positions that score a
    token: the same numbers (a test checks them against HFLM to 1e-4) for a fraction of the work. Contexts longer
    than the model's window fall back to HFLM's path."""
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
            keys = list(groups)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            scored = packed_loglikelihoods(self.model, [(list(k), [list(requests[i][2]) for i in groups[k]])
                                                        for k in keys], pad)
            for k, res in zip(keys, scored):
                for i, r in zip(groups[k], res):
                    out[i] = r
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
            return out

    return PrefixSharingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def run_zero_shot(lm: LoadedModel, tasks: list[str], folder: Path, data_dir: str | None, limit: int | None,
                  batch_size: int = 8, model_for_lm_eval=None, share_prefix: bool = True) -> dict[str, dict]:
    """Accuracy per task: {task: {"acc": .., "acc_norm": .., "n": .., "items": ..}}, ``items`` each question's
    correctness in question order as a string of 0/1 per metric ({"acc": "0110…", "acc_norm": "…"}), so two
    models' answers to the same questions can be compared pairwise. ``model_for_lm_eval`` replaces the
    loaded model with what lm-eval should load itself (a path), for checking aird against lm-eval direct, or
    with an lm-eval model object to score with (bench/bench_zeroshot.py's lm-eval vLLM backend)."""
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
    elif isinstance(model_for_lm_eval, (str, Path)):
        model = HFLM(pretrained=str(model_for_lm_eval), tokenizer=lm.tokenizer, batch_size=batch_size, device="cpu")
    else:
        model = model_for_lm_eval
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
