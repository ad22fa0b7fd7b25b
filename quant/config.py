"""What to quantize and how: the QuantConfig dataclass and the layer policy.

A scheme (fp8, int8, int8_wo, int8_wo_cs, nf4) says how one nn.Linear is stored and computed; the policy says
which of the DiT's linears are swapped. Only `nn.Linear` modules are candidates (the motion
encoder's EqualLinear/EqualConv2d and all convolutions stay as they are), and these never are:

- time_embedding.*, time_projection.*, head.head: engine/model.py runs them through `fp32_linear`,
  which reads `layer.weight` directly (the official fp32 islands), so a swapped module would be
  bypassed or break. They are 1% of the weights and run once per step on one row.

Which of the rest are kept in bf16, or get a different scheme, follows the measurement in
quant/report.py (`measure_exemptions`; the numbers are beside DEFAULT_KEEP below).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from typing import Callable, Iterable

import torch.nn as nn

from ..engine.errors import ValidationError

# fp32_linear reads these weights directly (engine/model.py): never quantized.
NEVER_QUANTIZED: tuple[str, ...] = ("time_embedding.*", "time_projection.*", "head.*")

# Named groups of the quantizable linears (fnmatch patterns on module names), used by the policy
# and by the exemption measurement.
GROUPS: dict[str, tuple[str, ...]] = {
    "embeddings": ("text_embedding.*", "img_emb.*", "face_encoder.*"),
    "face_adapter": ("face_adapter.*",),
    "self_attn": ("blocks.*.self_attn.*",),
    "cross_attn_q_o": ("blocks.*.cross_attn.q", "blocks.*.cross_attn.o"),
    "cross_attn_kv": ("blocks.*.cross_attn.k", "blocks.*.cross_attn.v",
                      "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"),
    "ffn": ("blocks.*.ffn.*",),
}

# Default exemptions, from quant/report.py::measure_exemptions on the 14B architecture cut to 5
# blocks (random weights, 8 outlier channels x20-100 per linear input, compensated; 192 tokens; CPU
# emulation; bench/quant_accuracy.py). FP8 DiT output rel L2 with only one group quantized:
#   embeddings 2.2%, cross-attn q/o 2.3%, cross-attn k/v 1.8%, face adapter 1.7%, FFN 1.1%,
#   self-attn 0.7%; everything 4.3%; everything but the first and last block 3.6%.
# Keeping the embeddings in bf16 is free (0.4% of the weights, run once per segment on a few hundred
# rows). The cross-attention k/v, the face adapter and the cross-attention q/o go to int8
# weight-only with column scales (int8_wo_cs, quant/int8.py; DEFAULT_OVERRIDES: 1 byte/weight plus
# 4 bytes per input channel, so 17.58 GB of FP8 DiT weights, 17.57 before).
# Policies measured (FP8 output rel L2, 5 blocks, compensated / uncompensated outliers;
# bench/quant_accuracy.py --policies and the int8_wo_cs rows):
#   k/v + face adapter int8_wo (the previous default)        2.83% / 4.60%  (40 blocks, GPU: 3.88%)
#   + cross-attn q/o int8_wo                                  2.22% / 4.09%  (cross q/o alone: 1.48% / 0.88%)
#   + also self_attn.o int8_wo                                2.23% / 3.79%
#   + also ffn.2 (the down projection) int8_wo                2.13% / 3.88%  (+2.4 ms per block: no)
#   cross q/o + k/v + face adapter int8_wo_cs (this default)  2.11% / 4.07%  (cross q/o alone: 0.68% / 0.90%)
#   (weight-only alone: int8_wo 1.9%, int8_wo_cs 1.69%)
# The 40-block output error was 1.37x the 5-block one for the previous default, so this default
# extrapolates to ~2.9% at 40 blocks (bench/quant.py measures it). Speed cost: an int8_wo linear
# is a weight dequant + bf16 GEMM, 2.31 ms vs 1.56 ms for the FP8 module (2.13 ms bf16) at
# 32760x5120x5120 on an H200: 2 per block, ~+60 ms per 480p step of ~2.5 s (the column scale
# adds one weight-sized multiply, ~0.05 ms). Without any overrides FP8 gives 3.7% (nf4 10.5%,
# W8A8 int8 20%: per-token int8 cannot hold 20-100x outlier channels). Keeping the first and last
# block in bf16 too gave 2.3% with the previous default but 18.39 GB, and the face adapter in
# bf16 18.41 GB: both over the 18 GB budget, so neither is the default (keep_edge_blocks=1 is
# one switch away).
DEFAULT_KEEP: tuple[str, ...] = GROUPS["embeddings"]
DEFAULT_EDGE_BLOCKS = 0

# Per-layer scheme overrides for the activation-quantizing schemes (fp8, int8): layers that get int8
# weight-only (with column scales: the consumers of outlier channels keep their small columns)
# instead, at the same 1 byte/weight.
# - cross-attention q and o: the largest share of the FP8 output error (e4m3's ~3.7% per GEMM on
#   the two linears around the text/image cross-attention; numbers above).
# - cross-attention k, v, k_img, v_img: run once per segment in prepare() on the 769 context rows,
#   448 of which are the identical zero-padded text rows (their quantization error is coherent, it
#   does not average out): measured the most sensitive group after cross q/o.
# - the face adapter: linear1_kv sees 5 motion tokens per frame; q/linear2 are 2.6% of the GEMM FLOPs.
ACTIVATION_SCHEMES = ("fp8", "int8")
# The context/face set above, the base of the policies measured on the GPU (POLICIES' P0).
CONTEXT_OVERRIDES: tuple[tuple[str, str], ...] = tuple(
    (p, "int8_wo_cs") for p in GROUPS["cross_attn_q_o"] + GROUPS["cross_attn_kv"] + GROUPS["face_adapter"])
# The default is policy P6 of the GPU measurement (POLICIES below; H200, 480p, all 40 blocks, random
# weights with outlier channels, bench/results/quant_h200_policies2.log): the context/face set plus
# the self-attention output projection and the FFN down projection on int8_wo_cs. FP8 + sage
# attention: DiT output rel L2 2.93% vs bf16 + SDPA, step 2.260 s vs 2.863 s = 1.267x; with only the
# context/face set (P0) 3.37% at 1.338x. Those two linears see the attention output and the GELU
# output, whose e4m3 rounding the rest of the block cannot average out.
DEFAULT_OVERRIDES: tuple[tuple[str, str], ...] = (
    ("blocks.*.self_attn.o", "int8_wo_cs"), ("blocks.*.ffn.2", "int8_wo_cs")) + CONTEXT_OVERRIDES
# The previous default (cross-attention q/o in FP8), for the measurements that compare against it.
PREVIOUS_OVERRIDES: tuple[tuple[str, str], ...] = tuple(
    (p, "int8_wo") for p in GROUPS["cross_attn_kv"] + GROUPS["face_adapter"])

KERNELS = ("auto", "no_triton", "reference")


@dataclass(frozen=True)
class QuantConfig:
    """scheme: a registered scheme name (quant/registry.py: fp8, int8, int8_wo, int8_wo_cs, nf4).
    keep: fnmatch patterns of module names kept in their original dtype.
    keep_edge_blocks: the first and the last N transformer blocks are kept as well.
    overrides: (fnmatch pattern, scheme) pairs, first match wins: that layer uses that scheme instead.
        None = DEFAULT_OVERRIDES for fp8/int8 and none for the weight-only schemes.
    fast_accum: FP8 only: cuBLASLt's fast accumulation (the torchao default for inference).
    kernel: "auto" uses the GPU kernels where their guard allows; "no_triton" keeps the vendor GEMMs
        (torch._scaled_mm, torch._int_mm, bitsandbytes) but quantizes activations and applies the
        INT8 epilogue in eager torch (a fallback, and the ablation of the fused kernels);
        "reference" always runs the pure-torch path (the exact CPU emulation).
    nf4_blocksize: elements per absmax block for nf4 (bitsandbytes' default 64).
    fuse_gelu: fold the FFN's GELU(tanh) into the FP8 down-projection's activation quantization
        (quant/api.py fuse_ffn_gelu; the same function up to the GELU's bf16 rounding). Off by
        default: measured slower on an H200 (1.08-1.25 ms for [32760, 13824] against ~0.45 ms GELU
        + 0.48 ms quantization; bench/results/quant_h200_policies*.log), and the default policy
        keeps the down projection on int8_wo_cs, where it does not apply."""
    scheme: str = "fp8"
    keep: tuple[str, ...] = DEFAULT_KEEP
    keep_edge_blocks: int = DEFAULT_EDGE_BLOCKS
    overrides: tuple[tuple[str, str], ...] | None = None
    fast_accum: bool = True
    kernel: str = "auto"
    nf4_blocksize: int = 64
    fuse_gelu: bool = False

    def __post_init__(self):
        from .registry import available_schemes
        if self.scheme not in available_schemes():
            raise ValidationError(f"unknown quantization scheme {self.scheme!r}; choose one of {available_schemes()}")
        if self.kernel not in KERNELS:
            raise ValidationError(f"kernel={self.kernel!r}: choose one of {KERNELS}")
        if self.keep_edge_blocks < 0:
            raise ValidationError(f"keep_edge_blocks={self.keep_edge_blocks} must be >= 0")
        if self.nf4_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValidationError(f"nf4_blocksize={self.nf4_blocksize} must be a power of two in 32..4096")
        object.__setattr__(self, "keep", tuple(self.keep))
        overrides = self.overrides
        if overrides is None:
            overrides = DEFAULT_OVERRIDES if self.scheme in ACTIVATION_SCHEMES else ()
        overrides = tuple((str(p), str(s)) for p, s in overrides)
        for _, s in overrides:
            if s not in available_schemes():
                raise ValidationError(f"override scheme {s!r} is not registered; choose one of {available_schemes()}")
        object.__setattr__(self, "overrides", overrides)

    def scheme_for(self, name: str) -> str:
        """The scheme of one layer: the first matching override, else `scheme`."""
        return next((s for p, s in self.overrides if fnmatch.fnmatchcase(name, p)), self.scheme)

    def replace(self, **changes) -> "QuantConfig":
        """dataclasses.replace; a new scheme also gets its own default overrides when the current
        ones are the old scheme's defaults (so fp8 -> nf4 does not keep fp8's int8_wo_cs layers)."""
        if "scheme" in changes and "overrides" not in changes:
            old_default = DEFAULT_OVERRIDES if self.scheme in ACTIVATION_SCHEMES else ()
            if self.overrides == old_default:
                changes["overrides"] = None
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            data = json.loads(text)
            overrides = data.get("overrides")
            return cls(**{**data, "keep": tuple(data.get("keep", ())),
                          "overrides": None if overrides is None else tuple(tuple(o) for o in overrides)})
        except (json.JSONDecodeError, TypeError) as e:
            raise ValidationError(f"unreadable quantization config {text[:200]!r} ({e})") from None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _edge_block(name: str, num_layers: int, n: int) -> bool:
    if n == 0 or not name.startswith("blocks."):
        return False
    index = int(name.split(".")[1])
    return index < n or index >= num_layers - n


def is_candidate(name: str, module: nn.Module) -> bool:
    """An nn.Linear that the model does not read `.weight` from directly."""
    return isinstance(module, nn.Linear) and not _matches(name, NEVER_QUANTIZED)


def select_linears(model: nn.Module, config: QuantConfig,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Names of the linears `config` quantizes in `model` (torchao-style filter_fn(module, name) narrows it)."""
    num_layers = len(getattr(model, "blocks", ()))
    out = []
    for name, module in model.named_modules():
        if not is_candidate(name, module) or _matches(name, config.keep):
            continue
        if _edge_block(name, num_layers, config.keep_edge_blocks):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        out.append(name)
    return out


# Named candidate policies for the FP8 path (issue 7: DiT output rel L2 <= 3% with the speed target
# kept), measured side by side as bench/quant.py rows "fp8+sage[P1]" etc. (--policies P0,P1,...).
# Each maps to QuantConfig field changes; the extra overrides go in front of CONTEXT_OVERRIDES (first
# match wins). DEFAULT_POLICY is QuantConfig()'s. Measured on an H200, 480p, fp8 + sage attention vs
# bf16 + SDPA (bench/results/quant_h200_policies*.log; int8_wo_cs costs per block vs fp8: +0.72 ms
# per 5120x5120 linear, +2.9 ms fc1 (ffn.0), +1.86 ms fc2 (ffn.2)):
#   P0 3.37% 1.338x | P1 3.17% 1.222x | P2 3.08% 1.326x | P3 2.99% 1.249x | P4 2.85% 1.203x
#   P6 2.93% 1.267x (the default: the only one within 3% and >= 1.25x) | P7 3.02% 1.256x
_FFN_WO = (("blocks.*.ffn.0", "int8_wo_cs"), ("blocks.*.ffn.2", "int8_wo_cs"))
_SELF_O_WO = (("blocks.*.self_attn.o", "int8_wo_cs"),)
# all four, so q/k/v keep one scheme (int8_wo_cs is not fusable into one qkv linear either way: its
# column scales are per input channel, engine/transforms.qkv_unfusable; the three stay separate)
_SELF_QKVO_WO = tuple((f"blocks.*.self_attn.{n}", "int8_wo_cs") for n in "qkvo")
POLICIES: dict[str, dict] = {
    "P0": {"overrides": CONTEXT_OVERRIDES},                                 # context + face only
    "P1": {"overrides": _FFN_WO + CONTEXT_OVERRIDES},                       # + FFN fc1/fc2
    "P2": {"overrides": _SELF_O_WO + CONTEXT_OVERRIDES},                    # + self-attn o
    "P3": {"overrides": _SELF_QKVO_WO + CONTEXT_OVERRIDES},                 # + self-attn q/k/v/o
    "P4": {"overrides": _FFN_WO + _SELF_O_WO + CONTEXT_OVERRIDES},          # P1 + P2
    # first and last block in bf16: ~18.39 GB (over the 18 GB budget; see the note above DEFAULT_KEEP)
    "P5": {"keep_edge_blocks": 1},
    "P6": {"overrides": DEFAULT_OVERRIDES},                                 # P2 + fc2: the default
    "P7": {"overrides": (("blocks.*.ffn.0", "int8_wo_cs"),) + _SELF_O_WO + CONTEXT_OVERRIDES},   # P2 + fc1
}
DEFAULT_POLICY = "P6"


def policy_config(name: str, scheme: str = "fp8", **changes) -> QuantConfig:
    """The QuantConfig of a named policy (POLICIES) for `scheme`, with further field changes."""
    if name not in POLICIES:
        raise ValidationError(f"unknown quantization policy {name!r}; choose one of {sorted(POLICIES)}")
    return QuantConfig(scheme, **{**POLICIES[name], **changes})
