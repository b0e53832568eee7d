"""aird compressor plugin: GPTQ with auto-gptq's solver, run layer by layer (sequentially) inside aird.

Registered through the ``aird`` entry-point group, exactly like aird's built-in compressors.
"""

from __future__ import annotations

import torch

from aird import hookimpl
from aird.core.errors import AirdError


def _auto_gptq():
    """auto-gptq's GPTQ solver, or one clear sentence on why it cannot run here."""
    try:
        from auto_gptq.quantization import GPTQ
    except ImportError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AirdError(
            "auto-gptq cannot run with this torch/transformers (" + reason + "): its last release, 0.7.1, "
            "is built for torch 2.2 and CUDA and does not import with transformers 5; use --method gptq, "
            "aird's built-in GPTQ on llm-compressor."
        ) from None
    return GPTQ


class AutoGPTQ:
    name = "autogptq"
    kind = "quantization"
    description = "GPTQ with auto-gptq's solver (third-party plugin; needs a working auto-gptq)"
    params = {"bits": 4, "group_size": 128}
    bits_allowed = (2, 3, 4, 8)

    @torch.no_grad()
    def compress(self, lm, params, calibration):
        GPTQ = _auto_gptq()
        model, layers = lm.model, lm.adapter.layers(lm.model)
        device = next(model.parameters()).device
        batches = [torch.tensor([ids], device=device) for ids in calibration.input_ids]
        for layer in layers:  # sequential: each layer sees the already-quantized layers below it
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            solvers = {n: GPTQ(m) for n, m in linears.items()}
            handles = [m.register_forward_hook(lambda mod, inp, out, n=n: solvers[n].add_batch(inp[0].data, out.data))
                       for n, m in linears.items()]
            try:
                for ids in batches:
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            finally:
                for h in handles:
                    h.remove()
            for n, solver in solvers.items():
                solver.quantizer.configure(params["bits"], perchannel=True, sym=True, mse=False)
                # fasterquant writes the quantize-dequantized weights back into the layer
                solver.fasterquant(blocksize=128, percdamp=0.01, group_size=params["group_size"] or -1, actorder=False)
                solver.free()
        return {"library": "auto-gptq", "solver": "auto_gptq.quantization.GPTQ", "format": "quantize-dequantized"}


@hookimpl
def aird_register_compressors(register):
    register(AutoGPTQ())
