"""Weight quantization of the DiT as module swaps behind a config and a registry (DESIGN.md §quant).

    from wanimate.quant import QuantConfig, quantize_
    quantize_(model, QuantConfig("fp8"))                     # a transform on a built model

Schemes (quant/registry.py; each a QuantLinear subclass in its own file):
    fp8      e4m3 weights per output channel + dynamic per-token e4m3 activations, torch._scaled_mm
    int8     W8A8 per-channel / per-token, torch._int_mm + fused epilogue
    int8_wo  int8 weights, bf16 activations (any GPU)
    int8_wo_cs  int8_wo with a per-input-channel scale too (small weight columns keep their precision)
    nf4      4-bit NormalFloat weights, bitsandbytes layout (smallest)
Policy (quant/config.py, measured in quant/report.py): the embeddings stay bf16; with fp8/int8 the
cross-attention (q, o and the context projections) and the face adapter use int8_wo_cs (same bytes, less error);
time embedding/projection and the head are never touched (engine/model.py reads their weights).
Offline: quant/checkpoint.py (`quantize_checkpoint`, `load_quantized_dit`); errors: quant/report.py;
LoRA merging: engine/lora.py. Apply quantize_ after any dtype change of the model.
"""
from . import fp8, int8, nf4  # noqa: F401  (register the built-in schemes)
from .api import (convert_for_runtime, create_quantized_state_dict, fuse_ffn_gelu, quantize_, quantized_modules,
                  weight_bytes)
from .config import DEFAULT_KEEP, GROUPS, NEVER_QUANTIZED, QuantConfig, select_linears
from .registry import QuantLinear, available_schemes, get_scheme, register_scheme

__all__ = ["QuantConfig", "quantize_", "convert_for_runtime", "fuse_ffn_gelu", "create_quantized_state_dict", "quantized_modules",
           "weight_bytes", "select_linears", "DEFAULT_KEEP", "GROUPS", "NEVER_QUANTIZED", "QuantLinear",
           "available_schemes", "get_scheme", "register_scheme"]
