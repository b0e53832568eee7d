"""GPU check: the same aird pipeline on CUDA and on the CPU must give the same answers; and hf generation speed
on the GPU for a model of the default model's shape.

    python bench/gpu_check.py --out DIR [--shape-of TOKENIZER_FOLDER]

1. The tiny refusing model of the test suite (tests/tiny.py, trained here) goes through probe → compress
   (magnitude 50%) → diff → repair (the default method and layer) → eval, with ``--device cpu``, with ``--device
   cuda --dtype float32`` and with ``--device cuda`` alone (its auto dtype, bfloat16), through the CLI exactly as a
   user runs it. Compared against the CPU: the chosen source (layer, position), the cosine of the two probes'
   directions, the repair's chosen layer, matrices and α, and per prompt the eval verdicts and refusal scores.
   ``--awq``: AWQ int4 (the study grid's CUDA-only entry) compresses the tiny model on CUDA, and the AWQ model is
   probed and diffed against the original.
2. ``--shape-of``: a folder with the default model's config.json and tokenizer (no weights: they do not travel
   to the GPU machine): a randomly initialised model of that shape answers 520 AdvBench prompts with the chat
   template, 32 new tokens, hf engine, fp32 and bf16, batches of 64. Random weights rarely stop early, so this
   is the speed of 520 × 32 generated tokens; the answers themselves mean nothing.
Results: DIR/gpu_check.json, and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def aird(*args: str, stdin: str | None = None) -> str:
    res = subprocess.run([sys.executable, "-m", "aird", *args, "--json"], input=stdin, capture_output=True,
                         text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"aird {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def pipeline(model: Path, data: Path, out: Path, device: list[str]) -> dict:
    """probe → compress → probe → diff → repair → eval; what the comparison needs."""
    common = ["--data-dir", str(data), *device]
    probe = ["--n-train", "32", "--n-val", "12", "--max-scored", "4", "--top-k", "1"]
    t0 = time.perf_counter()
    p0 = json.loads(aird("probe", "--model", str(model), "--out", str(out / "p0"), *probe, *common).splitlines()[-1])
    comp = aird("compress", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5", "--out",
                str(out / "m"), *common)
    aird("probe", "--model", "-", "--out", str(out / "p1"), *probe, *common, stdin=comp)
    d = json.loads(aird("diff", str(out / "p0"), str(out / "p1"), "--out", str(out / "d"), *device).splitlines()[-1])
    r = json.loads(aird("repair", "-", "--reference", str(out / "p0"), "--out", str(out / "r"), "--layer", "auto",
                        "--check-on", "none", *common, stdin=comp).splitlines()[-1])
    aird("eval", "--model", str(out / "m"), "--engine", "hf", "--harmful", "harmful_val", "--benign",
         "harmless_val", "--seen", "none", "--max-new-tokens", "6", "--out", str(out / "e"), *common)
    recs = [json.loads(x) for x in (out / "e" / "eval.jsonl").read_text().splitlines()]
    return {"seconds": round(time.perf_counter() - t0, 1), "source": p0["source"], "cosine_chosen": d["cosine_chosen"],
            "repair": {k: r.get(k) for k in ("layer", "matrix", "alpha", "method", "layer_ranking")},
            "prompts": [(x["set"], x["index"], x["refused"], x["refusal_score"], x["completion"])
                        for x in recs if x["record"] == "eval.prompt"]}


def direction_cosine(a: Path, b: Path) -> float:
    """Cosine of the two probes' chosen directions."""
    from aird.core.probe import load_probe

    x, y = (load_probe(p)[1].double().flatten() for p in (a, b))
    return float(x @ y / (x.norm() * y.norm()))


def awq(model: Path, data: Path, out: Path, device: str = "cuda") -> dict:
    """AWQ int4 on CUDA (group 32: the tiny model's rows are 64 wide), then probe and diff against the original."""
    common = ["--data-dir", str(data), "--device", device]
    t0 = time.perf_counter()
    c = json.loads(aird("compress", "--model", str(model), "--method", "awq", "--bits", "4", "--group-size", "32",
                        "--calib-samples", "8", "--out", str(out / "awq"), *common).splitlines()[-1])
    sec = round(time.perf_counter() - t0, 1)
    aird("probe", "--model", str(out / "awq"), "--out", str(out / "pa"), "--n-train", "32", "--n-val", "12",
         "--max-scored", "4", "--top-k", "1", *common)
    d = json.loads(aird("diff", str(out / "p0"), str(out / "pa"), "--out", str(out / "da"), "--device",
                        device).splitlines()[-1])
    return {"compress_seconds": sec, "format": c.get("format"), "bits": c.get("bits"),
            "max_distinct_per_group": c.get("max_distinct_per_group"), "cosine_chosen": d["cosine_chosen"],
            "quality": d.get("quality")}


def speed(shape_of: Path, n_new: int = 32, batches: tuple[int, ...] = (64, 256)) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aird.core.data import load_set
    from aird.core.generate import generate
    from aird.core.loading import _load_tokenizer, wrap_model

    cfg = AutoConfig.from_pretrained(str(shape_of))
    tok = _load_tokenizer(shape_of, False)
    rows = []
    # bf16 first this time (the first check ran fp32 first and found bf16 2.6x slower), each batch size timed
    # twice after a full-length warm-up, so that kernel selection and allocator growth fall outside the timing
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        lm = wrap_model(model, tok, spec="random, default shape", device=torch.device("cuda"))
        texts = [lm.adapter.format(tok, p.instruction) for p in load_set("advbench")]
        for batch in batches:
            generate(lm, texts[:batch], n_new, batch)          # warm-up at the timed shape
            for rep in range(2):
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
                t = time.perf_counter()
                gens = generate(lm, texts, n_new, batch)
                torch.cuda.synchronize()
                sec = time.perf_counter() - t
                n = sum(g.n_new_tokens for g in gens)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, "repeat": rep,
                             "prompts": len(texts), "new_tokens": n, "seconds": round(sec, 2),
                             "tokens_per_s": round(n / sec, 1),
                             "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
                print(json.dumps(rows[-1]), flush=True)
        del model, lm
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape-of", type=Path)
    ap.add_argument("--work", type=Path, help="scratch folder for models and runs [default: OUT/work]")
    ap.add_argument("--second-device", default="cuda", help="cpu: a dry run of the script without a GPU")
    ap.add_argument("--awq", action="store_true", help="also AWQ int4 on CUDA (needs llm-compressor)")
    args = ap.parse_args()
    import torch

    import tiny

    assert args.second_device == "cpu" or torch.cuda.is_available(), "no CUDA device"
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model, tok = tiny.refusing_model()
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    data = tiny.write_data_dir(work / "data")
    res = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}
    second = args.second_device
    # the three pipelines are independent (their own folders, their own processes): run side by side
    jobs = {"cpu": (work / "cpu", ["--device", "cpu"]),
            "cuda-fp32": (work / "cuda", ["--device", second, "--dtype", "float32"]),
            "cuda-auto": (work / "cuda-auto", ["--device", second] + (["--dtype", "bfloat16"] if second == "cpu" else []))}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(pipeline, work / "model", data, *v) for k, v in jobs.items()}
        runs = {k: f.result() for k, f in futures.items()}
    print(json.dumps({k: v["seconds"] for k, v in runs.items()}), flush=True)
    a = runs["cpu"]
    res["pipeline"] = {"seconds": {k: v["seconds"] for k, v in runs.items()}, "prompts": len(a["prompts"])}
    for name, folder in (("cuda-fp32", "cuda"), ("cuda-auto", "cuda-auto")):
        b = runs[name]
        res["pipeline"][name] = {
            "same_source": a["source"] == b["source"], "sources": [a["source"], b["source"]],
            "direction_cosine_vs_cpu": direction_cosine(work / "cpu" / "p0", work / folder / "p0"),
            "cosine_chosen": [a["cosine_chosen"], b["cosine_chosen"]], "repair": [a["repair"], b["repair"]],
            "verdicts_agree": sum(x[2] == y[2] for x, y in zip(a["prompts"], b["prompts"])),
            "answers_identical": sum(x[4] == y[4] for x, y in zip(a["prompts"], b["prompts"])),
            "max_score_diff": max(abs(x[3] - y[3]) for x, y in zip(a["prompts"], b["prompts"])),
        }
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    if args.shape_of:
        res["speed"] = speed(args.shape_of)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    if args.awq:
        try:
            res["awq"] = awq(work / "model", data, work / "cuda", second)
        except SystemExit as e:          # a failed command: recorded, the rest stays
            res["awq"] = {"error": str(e)[-2000:]}
        print(json.dumps(res["awq"]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
