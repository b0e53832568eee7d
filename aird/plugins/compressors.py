"""Built-in compressor plugins: pruning (magnitude, Wanda, SparseGPT) and quantization (RTN, GPTQ, AWQ).

Wanda, SparseGPT, GPTQ, AWQ and the RTN scales come from vllm-project's llm-compressor (`oneshot`). Written by
hand, with the reason:
- magnitude pruning: llm-compressor's MagnitudePruningModifier is a training-time schedule (init/final
  sparsity over optimizer steps); run through `oneshot` on llmcompressor 0.14.0.1 it left every weight as it
  was (tried: achieved sparsity 0.0), so aird zeroes the smallest weights itself;
- turning quantized weights into plain float weights: after `oneshot` with RTN the weights are still the
  originals (the fake quantization lives in a forward wrapper, with weight_scale/weight_zero_point beside
  them); aird applies compressed-tensors' own `fake_quantize` with those scales so the saved folder holds the
  quantize-dequantized values and loads anywhere, with no low-bit kernel (none is faster on a CPU). With
  ``--format compressed-tensors`` the quantizers' ``save_compressed`` packs the same values with
  compressed-tensors' ModelCompressor instead (llm-compressor's own save path needs its `oneshot` output
  directory, which aird does not use);
- AWQ on a machine without an accelerator: llm-compressor pins intermediate tensors to page-locked memory,
  which raises "Cannot access accelerator device when none is available"; the pinning is skipped there.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import os
import sys
import time
import warnings

import torch

from aird.core.hookspecs import hookimpl

LM_HEAD = "re:.*lm_head"


def _library() -> str:
    try:
        return f"llmcompressor {md.version('llmcompressor')}"
    except md.PackageNotFoundError:
        return "llmcompressor (not installed)"


def _require_llmcompressor(method: str):
    try:
        # importing llm-compressor logs a warning to stdout (its modifiers ask for the device while their
        # classes are defined, before any logger configuration of ours): stdout is aird's JSONL, keep it clean
        with contextlib.redirect_stdout(sys.stderr):
            import llmcompressor  # noqa: F401
            from llmcompressor.logger import LoggerConfig, configure_logger
    except ImportError:
        from aird.core.errors import AirdError

        raise AirdError(f"method {method} needs llm-compressor: pip install 'aird[compress]'.") from None
    # llm-compressor logs to stdout, where aird writes JSONL for pipelines: keep its warnings, on stderr
    configure_logger(LoggerConfig(console_log_level=None))
    from loguru import logger

    logger.add(sys.stderr, level=os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "WARNING").upper(),
               format="{time:HH:mm:ss} | llmcompressor | {level} - {message}")


def _decoder_linears(lm):
    return lm.adapter.linears(lm.model)


def _oneshot(lm, recipe, calibration=None, pipeline: str | None = None) -> None:
    from llmcompressor import oneshot

    kwargs = {}
    if calibration is not None:
        kwargs.update(dataset=calibration.dataset(), num_calibration_samples=len(calibration.input_ids),
                      max_seq_length=max(map(len, calibration.input_ids)), shuffle_calibration_samples=False)
    if pipeline:
        kwargs["pipeline"] = pipeline
    # llm-compressor logs at length to stdout; keep stdout for aird's JSONL
    with contextlib.redirect_stdout(io.StringIO()):
        oneshot(model=lm.model, tokenizer=lm.tokenizer, recipe=recipe, output_dir=None, **kwargs)


def _scheme(bits: int, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="group" if group_size else "channel", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


@torch.no_grad()
def _materialize(lm) -> int:
    """Replace each quantized Linear's weight by its quantize-dequantized value (idempotent for GPTQ/AWQ,
    whose weights already sit on the grid). Returns how many matrices were quantized."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n = 0
    names = {id(m): k for k, m in lm.model.named_modules()}
    scales, args = {}, None
    for _, _, mod in _decoder_linears(lm):
        scheme = getattr(mod, "quantization_scheme", None)
        scale = getattr(mod, "weight_scale", None)
        if scheme is None or scale is None or scheme.weights is None:
            continue
        zp = getattr(mod, "weight_zero_point", None)
        q = fake_quantize(mod.weight.data, scale, zp, scheme.weights)
        mod.weight.data.copy_(q.to(mod.weight.dtype))
        n += 1
        args = scheme.weights
        if args.symmetric and (zp is None or not bool(zp.any())):
            scales[names[id(mod)]] = scale.detach().clone()
    if scales and args is not None:
        # the grid travels with the dense folder (aird/core/qgrid.py), so a repair can stay on it
        strategy = getattr(args.strategy, "value", args.strategy)
        lm.quant_grid = {"scales": scales, "bits": args.num_bits, "strategy": str(strategy),
                         "group_size": args.group_size}
    return n


@contextlib.contextmanager
def _swapped(owner, attr: str, value):
    """``owner.attr`` is ``value`` inside the block and what it was after: how aird runs a library's pipeline with
    one of its functions replaced."""
    original = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, original)


class Magnitude:
    name = "magnitude"
    kind = "pruning"
    description = "zero the smallest-magnitude weights of every linear layer (unstructured or N:M)"
    params = {"sparsity": 0.5, "pattern": None}
    needs_calibration = False

    @torch.no_grad()
    def compress(self, lm, params, calibration):
        from aird.core.compress import parse_pattern

        nm = parse_pattern(params.get("pattern"))
        for _, _, mod in _decoder_linears(lm):
            w = mod.weight.data
            if nm is not None:
                n, m = nm
                groups = w.reshape(w.shape[0], -1, m)
                drop = groups.abs().topk(m - n, dim=-1, largest=False).indices
                groups.scatter_(-1, drop, 0.0)
            else:
                k = int(round(params["sparsity"] * w.numel()))
                if k:
                    idx = w.abs().flatten().topk(k, largest=False).indices
                    w.view(-1)[idx] = 0.0
        return {"library": "aird (hand-written: see aird/plugins/compressors.py)", "scope": "per matrix"}


class _LLMCPruner:
    kind = "pruning"
    params = {"sparsity": 0.5, "pattern": None}
    modifier = ""

    def compress(self, lm, params, calibration):
        _require_llmcompressor(self.name)
        from aird.core.compress import parse_pattern
        from llmcompressor.modifiers import pruning

        nm = parse_pattern(params.get("pattern"))
        # llm-compressor's "N:M" prunes N of every M weights; aird's N:M keeps N of every M
        structure = f"{nm[1] - nm[0]}:{nm[1]}" if nm else "0:0"  # "0:0" is its unstructured
        mod = getattr(pruning, self.modifier)(sparsity=params["sparsity"], mask_structure=structure,
                                              targets=["Linear"], ignore=[LM_HEAD])
        _oneshot(lm, mod, calibration, pipeline="sequential")
        return {"library": _library(), "recipe": f"{self.modifier}(sparsity={params['sparsity']}, mask_structure={structure!r})"}


class Wanda(_LLMCPruner):
    name = "wanda"
    description = "Wanda: prune by |weight| × input activation norm (llm-compressor)"
    modifier = "WandaPruningModifier"


class SparseGPT(_LLMCPruner):
    name = "sparsegpt"
    description = "SparseGPT: second-order pruning with weight reconstruction (llm-compressor)"
    modifier = "SparseGPTModifier"


class _RefusalPreserving:
    """The refusal-preserving variant of a compressor (``<method>-rp``, ``--protect-refusal``): what protects the
    reference direction is measured once on the dense model (aird/core/protect.py), and the method's own pipeline
    then runs with only its ranking (pruners: ``refusal_saliency`` beside the method's score) or its objective
    (GPTQ: ``refusal_hessians`` beside its Hessian) changed, so the sparsity, N:M pattern, bits and grid are exactly
    the method's. A subclass names what it measures and the context manager that patches its method."""

    protect_params = {"reference": None, "protect": 1.0, "protect_prompts": 32, "protect_probes": 3,
                      "protect_level": 0.0}
    params = {"sparsity": 0.5, "pattern": None, **protect_params}
    measures = ("saliency",)          # what aird.core.protect.refusal_measures computes for it: saliency, hessians

    def _protected(self, got: dict, strength: float):
        """The context manager that runs the method with ``got`` (refusal_measures' result) protecting it."""
        raise NotImplementedError

    def compress(self, lm, params, calibration):
        from aird.core.errors import AirdError
        from aird.core.protect import refusal_measures

        if not params.get("reference"):
            raise AirdError(f"method {self.name} needs --reference: the original model's probe folder.")
        if params["protect"] < 0:
            raise AirdError("--protect must be at least 0.")
        t = time.perf_counter()
        got = refusal_measures(lm, params["reference"], saliency="saliency" in self.measures,
                               hessians="hessians" in self.measures, n_prompts=params["protect_prompts"],
                               probes=params["protect_probes"], level=params["protect_level"])
        measured_s = round(time.perf_counter() - t, 3)
        with self._protected(got, params["protect"]):
            info = super().compress(lm, params, calibration)
        info.update(protect={"strength": params["protect"], "reference": str(params["reference"]),
                             "measures": list(self.measures),
                             "source": {"layer": got["layer"], "position": got["position"]},
                             "prompts": got["prompts"], "probes": got["probes"], "level": got["level"],
                             "d_norm": got["d_norm"], "chunk": got["chunk"], "matrices": len(got[self.measures[0]]),
                             "measure_seconds": measured_s})
        return info


class WandaRP(_RefusalPreserving, Wanda):
    """Wanda whose pruning score also counts each weight's refusal saliency: within a matrix, |w|·‖x‖ / mean +
    protect · R / mean, so the weights whose removal would move the reference probe's refusal direction most are
    kept; llm-compressor's own sequential Wanda pipeline does the rest."""

    name = "wanda-rp"
    description = "refusal-preserving Wanda: Wanda's score plus each weight's refusal saliency (--reference PROBE)"

    def _protected(self, got, strength):
        return _protected_wanda(got["saliency"], strength)


class SparseGPTRP(_RefusalPreserving, SparseGPT):
    """SparseGPT whose mask also counts each weight's refusal saliency: where SparseGPT compares w²/[H⁻¹]_jj² within
    each block of columns (or each row's M columns), this compares |w|/[H⁻¹]_jj / mean + protect · |w|·G / mean,
    G the saliency per unit weight (R / |w| on the dense matrix), so a weight's protection follows its value as
    SparseGPT's reconstruction updates it. And SparseGPT's Hessian H becomes H + protect · tr(H) · H_r, the
    refusal-weighted Hessian gptq-rp uses, so that both the mask's [H⁻¹]_jj and the reconstruction of the kept
    weights also answer for the tokens where the matrix's output moves the refusal difference. The loop is
    SparseGPT's (aird's copy of llm-compressor 0.14's ``sparsify_weight``, with the mask chosen from the
    protected score and exactly ⌊sparsity · block⌋ weights pruned per block); saliency and H_r come from one
    backward pass."""

    name = "sparsegpt-rp"
    measures = ("saliency", "hessians")
    description = "refusal-preserving SparseGPT: refusal saliency in its mask, the refusal-weighted Hessian in its reconstruction (--reference PROBE)"

    def _protected(self, got, strength):
        return _protected_sparsegpt(got["saliency"], strength, got["hessians"])


@contextlib.contextmanager
def _protected_wanda(saliency: dict, strength: float):
    """llm-compressor's Wanda with the protected score: its ``sparsify_weight`` (wanda/wanda_sparsify.py, 0.14)
    with ``W_metric`` replaced by aird.core.protect.protected_scores of it, for the matrices with a saliency."""
    from llmcompressor.modifiers.pruning.wanda import base

    from aird.core.protect import protected_scores

    original = base.sparsify_weight

    def sparsify_weight(module, row_scalars_dict, sparsity, prune_n, prune_m):
        if module not in saliency or not isinstance(module, torch.nn.Linear):
            return original(module, row_scalars_dict, sparsity, prune_n, prune_m)
        shape, dtype = module.weight.shape, module.weight.dtype
        W = module.weight.data.clone().float()
        S = row_scalars_dict.pop(module)
        metric = protected_scores(W.abs() * S.reshape(1, -1).sqrt(), saliency[module], strength)
        mask = torch.zeros_like(metric, dtype=torch.bool)
        if prune_n:
            for ii in range(0, metric.shape[1], prune_m):
                tmp = metric[:, ii: ii + prune_m]
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
        else:
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
            mask.scatter_(1, idx, True)
        W[mask] = 0.0
        return W.reshape(shape).to(dtype)

    with _swapped(base, "sparsify_weight", sparsify_weight):
        yield


@contextlib.contextmanager
def _protected_sparsegpt(saliency: dict, strength: float, hessians: dict | None = None):
    """llm-compressor's SparseGPT with the protected mask and, for the matrices with a refusal Hessian, the
    protected Hessian (aird.core.protect.protected_hessian) in both its mask and its reconstruction; the matrices
    without a saliency, and any call that asks to preserve an existing mask, keep llm-compressor's own
    ``sparsify_weight``."""
    from llmcompressor.modifiers.pruning.sparsegpt import base

    from aird.core.protect import protected_hessian

    original = base.sparsify_weight

    def sparsify_weight(module, hessians_dict, sparsity, prune_n, prune_m, block_size, dampening_frac,
                        preserve_sparsity_mask):
        if module not in saliency or not isinstance(module, torch.nn.Linear) or preserve_sparsity_mask:
            return original(module, hessians_dict, sparsity, prune_n, prune_m, block_size, dampening_frac,
                            preserve_sparsity_mask)
        H = protected_hessian(hessians_dict.pop(module), (hessians or {}).get(module), strength)
        return sparsegpt_protected(module.weight.data, H, saliency[module], strength, sparsity, prune_n, prune_m,
                                   block_size, dampening_frac)

    with _swapped(base, "sparsify_weight", sparsify_weight):
        yield


def sparsegpt_protected(weight: torch.Tensor, H: torch.Tensor, saliency: torch.Tensor, strength: float,
                        sparsity: float, prune_n: int, prune_m: int, block_size: int = 128,
                        dampening_frac: float = 0.01) -> tuple[float, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023; the loop of llm-compressor 0.14's ``sgpt_sparsify.sparsify_weight``,
    Apache-2.0) with the mask chosen by the protected score: (loss, pruned weight). ``prune_n`` of every
    ``prune_m`` weights of a row are pruned when ``prune_n`` is set, else ⌊sparsity · rows · block⌋ weights of each
    block of columns. With ``strength`` 0 the mask is SparseGPT's own (up to its ties)."""
    from aird.core.protect import protected_scores

    shape, dtype = weight.shape, weight.dtype
    W = weight.clone().float()
    H = H.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gain = saliency.to(W.device, torch.float32) / W.abs().clamp_min(1e-12)      # R per unit |w|
    gain[W == 0] = 0
    try:
        diag = torch.arange(cols, device=H.device)
        H[diag, diag] += dampening_frac * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch._C._LinAlgError:
        Hinv = torch.eye(cols, dtype=H.dtype, device=H.device)
    # one mean per matrix for each term, from the dense weights, so every block weighs them alike
    means = (float((W.abs() / torch.diag(Hinv).reshape(1, -1)).mean()), float(saliency.float().mean()))

    def score(w: torch.Tensor, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        # |w|/d: the square root of SparseGPT's w²/d², the same order; |w|·g: the saliency at the current weight
        return protected_scores(w.abs() / d.reshape(1, -1), w.abs() * g, strength, means)

    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, L1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not prune_n:
            sc = score(W1, gain[:, i1:i2], d1).flatten()
            k = int(sc.numel() * sparsity)
            mask1.view(-1)[torch.sort(sc, stable=True)[1][:k]] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n and i % prune_m == 0:
                sc = score(W1[:, i: i + prune_m], gain[:, i1 + i: i1 + i + prune_m], d1[i: i + prune_m])
                mask1.scatter_(1, i + torch.topk(sc, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            L1[:, i] = (w - q) ** 2 / d ** 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        losses += L1.sum(1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return float(losses.sum()), W.reshape(shape).to(dtype)


class _LLMCQuantizer:
    kind = "quantization"
    bits_allowed = (4, 8)

    def _modifier(self, params):
        raise NotImplementedError

    def compress(self, lm, params, calibration):
        _require_llmcompressor(self.name)
        mod = self._modifier(params)
        _oneshot(lm, mod, calibration, pipeline=getattr(self, "pipeline", None))
        n = _materialize(lm)
        names = "+".join(type(m).__name__ for m in (mod if isinstance(mod, list) else [mod]))
        return {"library": _library(), "recipe": f"{names}(int{params['bits']}, group_size={params['group_size']})",
                "quantized_matrices": n}

    def save_compressed(self, lm, folder) -> str:
        """Write ``folder`` in the compressed-tensors format (packed int4, or int8, weights with their scales
        and the quantization_config vLLM reads), with compressed-tensors' own compressor; returns its format
        name. The in-memory model is left packed: call it last."""
        from compressed_tensors.compressors import ModelCompressor

        mc = ModelCompressor.from_pretrained_model(lm.model)
        if mc is None or mc.quantization_config is None:
            from aird.core.errors import AirdError

            raise AirdError(f"{self.name} left no quantization scheme on the model to write compressed-tensors from.")
        mc.compress_model(lm.model)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # compressed-tensors' wrappers make transformers think modules are offloaded: nothing is
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            lm.model.save_pretrained(str(folder))
        mc.update_config(str(folder))
        return str(getattr(mc.quantization_config.format, "value", mc.quantization_config.format))


class RTN(_LLMCQuantizer):
    name = "rtn"
    description = "round-to-nearest weight-only int8/int4, symmetric, per channel or per group"
    params = {"bits": 8, "group_size": None}
    needs_calibration = False

    def _modifier(self, params):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=_scheme(params["bits"], params["group_size"]), ignore=[LM_HEAD])


class GPTQ(_LLMCQuantizer):
    name = "gptq"
    description = "GPTQ weight-only quantization with error compensation (llm-compressor)"
    params = {"bits": 4, "group_size": 128}
    pipeline = "sequential"

    def _modifier(self, params):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=_scheme(params["bits"], params["group_size"]), ignore=[LM_HEAD])


class GPTQRP(_RefusalPreserving, GPTQ):
    """GPTQ whose layer-wise objective also counts the refusal direction: for every matrix below the reference
    direction's source layer, GPTQ's Hessian H (of the calibration inputs) becomes H + protect · tr(H) · H_r, H_r
    the inputs' second moment over the reference probe's training prompts with each token weighted by how much the
    matrix's output there moves the difference of means d (aird.core.protect.refusal_hessians). The quantization
    is GPTQ's own (llm-compressor's sequential pipeline, the same observer scales and grid): only which integer
    codes the error compensation picks changes."""

    name = "gptq-rp"
    description = "refusal-preserving GPTQ: GPTQ's Hessian plus the refusal-weighted one (--reference PROBE)"
    params = {"bits": 4, "group_size": 128, **_RefusalPreserving.protect_params}
    measures = ("hessians",)

    def _protected(self, got, strength):
        return _protected_gptq(got["hessians"], strength)


@contextlib.contextmanager
def _protected_gptq(hessians: dict, strength: float):
    """llm-compressor's GPTQ with the protected Hessian: its ``prepare_batch`` (gptq/helpers.py, 0.14), which turns
    the accumulated Hessians into the normalized ones ``quantize_weight`` reads, followed by
    aird.core.protect.protected_hessian for the matrices with a refusal Hessian."""
    from llmcompressor.modifiers.gptq import base

    from aird.core.protect import protected_hessian

    original = base.prepare_batch

    def prepare_batch(batch, batch_qparams, hessians_by_module, num_samples_by_module):
        weights, H, *rest = original(batch, batch_qparams, hessians_by_module, num_samples_by_module)
        for i, module in enumerate(batch):
            if module in hessians:
                H[i] = protected_hessian(H[i], hessians[module], strength)
        return (weights, H, *rest)

    with _swapped(base, "prepare_batch", prepare_batch):
        yield


class AWQ(_LLMCQuantizer):
    name = "awq"
    description = "AWQ activation-aware weight-only quantization (llm-compressor; slow on a CPU)"
    params = {"bits": 4, "group_size": 128}
    pipeline = "sequential"

    def _modifier(self, params):
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ smooths (per-channel scales searched on calibration data), then the weights are quantized
        return [AWQModifier(), QuantizationModifier(config_groups=_scheme(params["bits"], params["group_size"]),
                                                    ignore=[LM_HEAD])]

    def compress(self, lm, params, calibration):
        _require_llmcompressor(self.name)
        from llmcompressor.pipelines import cache

        no_pinning = _swapped(cache.IntermediatesCache, "pin_memory", lambda self, *a, **k: None)
        with contextlib.nullcontext() if torch.cuda.is_available() else no_pinning:
            return super().compress(lm, params, calibration)


class W8A8(_LLMCQuantizer):
    """SmoothQuant + GPTQ, int8 weights and int8 activations (llm-compressor's W8A8 preset).

    The weights are written quantize-dequantized like the other quantizers. Activations cannot live in a
    weight file: the folder's config records ``aird_activation_quantization`` (int8, per token, dynamic,
    symmetric, as the preset quantizes them) and aird's model loader quantize-dequantizes the input of every
    decoder Linear with it, so probe, eval and repair see the W8A8 model. (A plain transformers load of the
    folder sees only the int8 weights: W8A16.)"""

    name = "w8a8"
    description = "SmoothQuant + GPTQ int8 weights and int8 per-token activations (llm-compressor)"
    params = {"bits": 8, "group_size": None}
    bits_allowed = (8,)
    pipeline = "sequential"

    def _modifier(self, params):
        from compressed_tensors.quantization import preset_name_to_scheme
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        if params.get("group_size"):
            from aird.core.errors import AirdError

            raise AirdError("w8a8 quantizes weights per output channel; it takes no --group-size.")
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])}, ignore=[LM_HEAD])]

    def compress(self, lm, params, calibration):
        from aird.core.loading import ACTIVATION_QUANT_KEY, activation_quant_hooks

        info = super().compress(lm, params, calibration)
        spec = {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
        setattr(lm.model.config, ACTIVATION_QUANT_KEY, spec)
        _strip_quantization(lm)
        activation_quant_hooks(lm.model, lm.adapter, spec)
        lm.model._aird_act_quant = True
        info["activation_quantization"] = spec
        return info

    def save_compressed(self, lm, folder) -> str:
        # the compressed-tensors config carries the activation scheme itself; aird's loader reads it from there
        from aird.core.loading import ACTIVATION_QUANT_KEY

        if hasattr(lm.model.config, ACTIVATION_QUANT_KEY):
            delattr(lm.model.config, ACTIVATION_QUANT_KEY)
        return super().save_compressed(lm, folder)


def _strip_quantization(lm) -> None:
    """Switch off compressed-tensors' forward wrappers once the weights are materialized, so the in-memory
    model computes what the saved folder will (aird's own activation hooks take their place)."""
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    lm.model.apply(disable_quantization)


@hookimpl
def aird_register_compressors(register):
    for cls in (Magnitude, Wanda, WandaRP, SparseGPT, SparseGPTRP, RTN, GPTQ, GPTQRP, AWQ, W8A8):
        register(cls())
