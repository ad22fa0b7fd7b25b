"""How much a scheme changes the DiT: per-layer and output errors against the unquantized model.

`quantization_error(model, config, run)` is the general tool: it runs `run(model)` on the float
model, swaps the selected linears for quantized ones (keeping the float modules aside), runs again
with hooks that compare every quantized layer with its float original on the same input, and puts
the float modules back. The end-to-end pipeline can pass any `run` (the lead wires the fixture).
`accuracy_report` does this for one DiT denoising step and returns a printable table and a dict.

Real DiT activations carry a few channels 20-100x larger than the rest (from the modulation
scale/shift, the norm3 affine, value rows and FFN hidden units). Random recipe weights do not, so
`inject_outliers` plants them, keeping the float function (nearly) unchanged: the producing side of
a channel is multiplied by s in [20, 100] and the consuming weight columns are divided by s. Per-token
scales then see the outlier, per-channel weight scales do not: the case SmoothQuant is about.
On the CPU every scheme runs its exact emulation (quant/fp8.py, quant/int8.py), so these numbers are
what the GPU kernels produce up to fp32 accumulation order (and FP8 fast accumulation, which
bench/quant.py measures on the GPU).

Measured (bench/quant_accuracy.py, CPU, bf16 reference; DiT output = one call's velocity, rel L2;
8 outlier channels x U[20, 100] per linear input; default policy of quant/config.py):

    model                         outliers        fp8     int8    int8_wo   nf4
    14B arch, 5 blocks, 192 tok   compensated     2.8%    20.3%   1.9%      10.5%
    14B arch, 5 blocks, 192 tok   uncompensated   4.6%    13.1%   1.6%      20.5%
    tiny (recipe), 5 blocks       none            1.8%    0.6%    0.5%      4.9%    (earlier policy*)
    per-layer (14B, compensated)                  3.7%    25-34%  0.9-2.6%  9-10%   (block linears)
    fp8 variants, 14B 5 blocks:  default + first/last block kept 2.3% / 3.3% (comp. / uncomp.);
                                 without the int8_wo overrides 3.7% / 6.3%
    depth, compensated:          14B arch 10 blocks: fp8 3.6%, int8_wo 2.3% (5 blocks: 2.8%, 1.9%).
    The output error grows about as depth^(1/3) here, so 40 blocks extrapolate to ~5-6% for fp8 on
    random weights (bench/quant.py measures it on the GPU; a trained model's sensitivity differs).
    (The fp8 rows above used the policy with cross-attention q/o in FP8; the 40-block GPU run gave
    3.88%. The current default, cross q/o + k/v + face adapter on int8_wo_cs, gives 2.11% / 4.07% at
    5 blocks: measure_policies, numbers in quant/config.py.)

* the tiny rows used the earlier default (face adapter in bf16, no overrides). Reading: e4m3 costs
~3.7% per layer whatever the outliers (it has an exponent); per-token INT8 loses the small channels
of a token whose scale an outlier sets (use fp8 or int8_wo, or keep int8 for outlier-free models);
weight-only schemes suffer only where weight columns are small (compensated case). "Uncompensated"
outliers make the random network itself more sensitive (the same ~3.3% per-layer error becomes 4.6%
at the output), so it is a stress case; the compensated model keeps the float function and
isolates the quantization. Only 5 of 40 blocks fit a 2-core CPU run; bench/quant.py measures the
full 40-block model on the GPU (same weights recipe, compensated outliers).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import _set_module
from .config import DEFAULT_OVERRIDES, GROUPS, PREVIOUS_OVERRIDES, QuantConfig, select_linears
from .registry import get_scheme


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------
# Inputs and outlier channels


def dit_inputs(cfg, *, seed: int = 0, frames: int = 2, hw: tuple[int, int] = (16, 24), text_rows: int = 64,
               device="cpu", outlier_channels: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of one DiT call: latents [1, 16, F+1, h, w] (tokens = (F+1) h w / 4), t, y, pose,
    face crops [1, 3, 4F-3, S, S], T5 context [1, text_rows, text_dim], CLIP [1, 257, image_dim].
    `outlier_channels` > 0 scales that many context/CLIP channels by 20-100 (T5's massive channels)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    x = dict(
        latents=torch.randn(1, 16, frames + 1, h, w, generator=g),
        t=torch.tensor([731]),
        y=torch.randn(1, 20, frames + 1, h, w, generator=g),
        pose=torch.randn(1, 16, frames, h, w, generator=g),
        face=torch.rand(1, 3, 4 * frames - 3, cfg.motion_size, cfg.motion_size, generator=g) * 2 - 1,
        context=torch.randn(1, text_rows, cfg.text_dim, generator=g),
        clip=torch.randn(1, 257, cfg.image_dim, generator=g),
    )
    for key in ("context", "clip") if outlier_channels else ():
        idx, s = _pick(outlier_channels, x[key].shape[-1], g, 20.0, 100.0)
        x[key][..., idx] *= s
    return {k: v.to(device) for k, v in x.items()}


@torch.no_grad()
def random_dit(cfg, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """A DiT with seeded random weights built in place (meta -> to_empty, no float32 copy): fan-in
    scaled normal matrices, ones for norm weights, 0.05-scale biases and modulation. For measuring
    the 14B architecture without its checkpoint (as in bench/quant_accuracy.py and bench/quant.py)."""
    from ..engine.loader import build_dit, constant_buffers
    model = build_dit(cfg).to(dtype).to_empty(device=device)
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        if p.dim() >= 2:
            p.normal_(0, 1 / math.sqrt(math.prod(p.shape[1:])), generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.05, generator=g)
    buffers = dict(model.named_buffers())
    for name, value in constant_buffers(model).items():
        buffers[name].copy_(value)
    return model.eval().requires_grad_(False)


def _pick(n: int, size: int, g: torch.Generator, low: float, high: float):
    idx = torch.randperm(size, generator=g)[: min(n, size)]
    return idx, low + (high - low) * torch.rand(len(idx), generator=g)


@torch.no_grad()
def inject_outliers(model: nn.Module, *, channels: int = 8, low: float = 20.0, high: float = 100.0,
                    seed: int = 0, compensate: bool = True) -> None:
    """Plant `channels` outlier input channels (x s, s ~ U[low, high]) in the inputs of every block
    linear that has them in real DiTs. With `compensate` the consuming weight columns are divided by
    s, so the float function is (nearly) unchanged and the weights get matching small columns (the
    hard case for weight-only schemes too); without it the weights stay random and the outlier
    channels dominate the layer outputs."""
    g = torch.Generator().manual_seed(seed)

    def scale_cols(linears, idx, s):
        if not compensate:
            return
        for lin in linears:
            lin.weight[:, idx.to(lin.weight.device)] /= s.to(lin.weight)

    def scale_rows(lin, idx, s, rows=slice(None)):
        w = lin.weight[rows]
        dev_idx = idx.to(w.device)
        w[dev_idx] *= s.to(w)[:, None]
        if lin.bias is not None:
            lin.bias[rows][dev_idx] *= s.to(lin.bias)

    for blk in model.blocks:
        dim = blk.modulation.shape[-1]
        mod = blk.modulation[0]                                              # [6, C]: shift1 scale1 gate1 shift2 scale2 gate2
        for shift, scale, consumers in ((0, 1, (blk.self_attn.q, blk.self_attn.k, blk.self_attn.v)),
                                        (3, 4, (blk.ffn[0],))):
            idx, s = _pick(channels, dim, g, low, high)
            d = idx.to(mod.device)
            mod[scale, d] = (1 + mod[scale, d]) * s.to(mod) - 1             # (1 + scale) grows by s
            mod[shift, d] *= s.to(mod)
            scale_cols(consumers, idx, s)
        idx, s = _pick(channels, dim, g, low, high)                           # cross-attention query input
        blk.norm3.weight[idx.to(blk.norm3.weight.device)] *= s.to(blk.norm3.weight)
        blk.norm3.bias[idx.to(blk.norm3.bias.device)] *= s.to(blk.norm3.bias)
        scale_cols((blk.cross_attn.q,), idx, s)
        idx, s = _pick(channels, dim, g, low, high)                           # self-attention output proj input
        scale_rows(blk.self_attn.v, idx, s)
        scale_cols((blk.self_attn.o,), idx, s)
        idx, s = _pick(channels, dim, g, low, high)                           # cross-attention output proj input
        scale_rows(blk.cross_attn.v, idx, s)
        scale_rows(blk.cross_attn.v_img, idx, s)
        scale_cols((blk.cross_attn.o,), idx, s)
        ffn_dim = blk.ffn[0].out_features
        idx, s = _pick(channels, ffn_dim, g, low, high)                       # FFN hidden units (GELU ~ linear for large z)
        scale_rows(blk.ffn[0], idx, s)
        scale_cols((blk.ffn[2],), idx, s)
    for fb in model.face_adapter.fuser_blocks:                               # face block value rows -> linear2
        dim = fb.linear2.in_features
        idx, s = _pick(channels, dim, g, low, high)
        scale_rows(fb.linear1_kv, idx, s, rows=slice(dim, 2 * dim))
        scale_cols((fb.linear2,), idx, s)


# ----------------------------------------------------------------------------------------------
# Errors


@dataclass
class QuantError:
    output_rel_l2: float
    output_max_abs: float
    layers: dict[str, float] = field(default_factory=dict)      # module name -> rel L2 of its output
    names: list[str] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def quantization_error(model: nn.Module, config: QuantConfig, run: Callable[[nn.Module], torch.Tensor], *,
                       names: list[str] | None = None, per_layer: bool = True,
                       reference: torch.Tensor | None = None) -> QuantError:
    """Quantize `names` (default: what `config` selects) temporarily and compare run(model) with the
    float model's (or with `reference`). The float modules are restored before returning."""
    t0 = time.perf_counter()
    ref = run(model) if reference is None else reference
    names = select_linears(model, config) if names is None else names
    originals = {n: model.get_submodule(n) for n in names}
    layer_err: dict[str, list[float]] = {}
    hooks = []
    try:
        for n, lin in originals.items():
            q = get_scheme(config.scheme_for(n)).from_linear(lin, config)
            if per_layer:
                def hook(mod, args, out, lin=lin, n=n):
                    want = F.linear(args[0], lin.weight, lin.bias)
                    layer_err.setdefault(n, []).append(rel_l2(out, want))
                hooks.append(q.register_forward_hook(hook))
            _set_module(model, n, q)
        got = run(model)
    finally:
        for h in hooks:
            h.remove()
        for n, lin in originals.items():
            _set_module(model, n, lin)
    return QuantError(rel_l2(got, ref), float((got.double() - ref.double()).abs().max()),
                      {n: max(v) for n, v in layer_err.items()}, list(names), time.perf_counter() - t0)


def dit_runner(inputs: dict[str, torch.Tensor]) -> Callable[[nn.Module], torch.Tensor]:
    """One full DiT call (prepare + denoise) on fixed inputs."""
    def run(model):
        return model(inputs["latents"], inputs["t"], inputs["y"], inputs["pose"], inputs["face"],
                     inputs["context"], inputs["clip"])
    return run


def layer_kind(name: str) -> str:
    """blocks.12.self_attn.q -> self_attn.q; face_adapter.fuser_blocks.3.linear2 -> face_adapter.linear2."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(parts[2:])
    if parts[0] == "face_adapter":
        return "face_adapter." + ".".join(parts[3:])
    return name


def summarize_layers(layers: dict[str, float]) -> dict[str, dict[str, float]]:
    kinds: dict[str, list[float]] = {}
    for n, e in layers.items():
        kinds.setdefault(layer_kind(n), []).append(e)
    return {k: {"mean": sum(v) / len(v), "max": max(v), "n": len(v)} for k, v in sorted(kinds.items())}


@dataclass
class AccuracyReport:
    table: str
    data: dict


def accuracy_report(model: nn.Module, schemes: list[str] | tuple[str, ...] = ("fp8", "int8", "int8_wo", "nf4"), *,
                    inputs: dict[str, torch.Tensor] | None = None, config: QuantConfig | None = None,
                    label: str = "") -> AccuracyReport:
    """Per-layer and output errors of each scheme (with `config`'s policy, default QuantConfig) on one
    DiT call of a float model. Returns a table (per layer kind: mean/max rel L2; the output) and a dict."""
    inputs = inputs if inputs is not None else dit_inputs(model.cfg, device=next(model.parameters()).device)
    run = dit_runner(inputs)
    ref = run(model)
    data = {"label": label, "tokens": int(math.prod(ref.shape[2:]) // 4), "schemes": {}}
    lines = [f"accuracy {label} (output = DiT velocity, rel L2 vs the unquantized model)",
             f"{'scheme':8} {'layer':28} {'mean rel':>9} {'max rel':>9} {'n':>4}"]
    for scheme in schemes:
        cfg = (config or QuantConfig(scheme)).replace(scheme=scheme)
        err = quantization_error(model, cfg, run, reference=ref)
        kinds = summarize_layers(err.layers)
        data["schemes"][scheme] = {"output_rel_l2": err.output_rel_l2, "output_max_abs": err.output_max_abs,
                                   "layer_kinds": kinds, "layers": err.layers, "n_quantized": len(err.names),
                                   "config": cfg.to_json()}
        for k, v in kinds.items():
            lines.append(f"{scheme:8} {k:28} {v['mean']:9.4f} {v['max']:9.4f} {v['n']:4d}")
        lines.append(f"{scheme:8} {'== DiT output':28} {err.output_rel_l2:9.4f} {'':9} {len(err.names):4d}")
    return AccuracyReport("\n".join(lines), data)


def checkpoint_accuracy_report(ckpt_dir, schemes=("fp8", "int8", "int8_wo", "nf4"), *, device="cpu",
                               hw: tuple[int, int] = (16, 16), config: QuantConfig | None = None) -> AccuracyReport:
    """`wanimate quantize --report`: the errors of each scheme on a real checkpoint (bf16 on `device`;
    on the CPU every scheme runs its exact emulation), at a reduced token count."""
    from ..engine.loader import load_dit
    model = load_dit(ckpt_dir, dtype=torch.bfloat16, device=device)
    inputs = dit_inputs(model.cfg, hw=hw, device=device)
    return accuracy_report(model, schemes, inputs=inputs, config=config, label=str(ckpt_dir))


def reference_accuracy_report(which: str = "tiny", schemes=("fp8", "int8", "int8_wo", "nf4"), *,
                              outliers: str = "compensated", num_layers: int = 5,
                              hw: tuple[int, int] | None = None) -> AccuracyReport:
    """The errors without a checkpoint: `which` = "tiny" (recipe weights) or "14b-arch" (the 14B
    architecture cut to `num_layers` blocks, random weights); outliers "none", "compensated" or
    "uncompensated" (inject_outliers). CPU, bf16 reference, exact emulation of every scheme."""
    from ..engine.config import DiTConfig, preset
    from ..engine.loader import recipe_dit
    if which == "tiny":
        cfg = preset("tiny").dit
        model, hw = recipe_dit(cfg, 1234, dtype=torch.bfloat16), hw or (8, 8)
    elif which == "14b-arch":
        cfg = DiTConfig(num_layers=num_layers)
        model, hw = random_dit(cfg), hw or (16, 16)
    else:
        from ..engine.errors import ValidationError
        raise ValidationError(f"which={which!r}: choose 'tiny' or '14b-arch'")
    if outliers != "none":
        inject_outliers(model, compensate=outliers == "compensated")
    inputs = dit_inputs(cfg, hw=hw, outlier_channels=0 if outliers == "none" else 8)
    return accuracy_report(model, schemes, inputs=inputs, label=f"{which} outliers={outliers}")


def measure_exemptions(model: nn.Module, schemes: tuple[str, ...] = ("fp8", "int8"), *,
                       inputs: dict[str, torch.Tensor] | None = None, label: str = "") -> AccuracyReport:
    """Which exemptions matter: the output error with everything quantized, with only one group
    quantized (its share of the error), with the default policy, and with the first and last
    block kept. Everything else unchanged (fast_accum irrelevant on the CPU)."""
    inputs = inputs if inputs is not None else dit_inputs(model.cfg, device=next(model.parameters()).device)
    run = dit_runner(inputs)
    ref = run(model)
    everything = QuantConfig("fp8", keep=(), overrides=())
    variants: dict[str, tuple[QuantConfig, Callable | None]] = {"all": (everything, None)}
    for g, patterns in GROUPS.items():
        variants[f"only {g}"] = (everything, _only(patterns))
    variants["keep embeddings, no overrides"] = (QuantConfig("fp8", overrides=()), None)
    variants["previous default (cross q/o fp8)"] = (QuantConfig("fp8", overrides=PREVIOUS_OVERRIDES), None)
    variants["default policy"] = (QuantConfig("fp8"), None)
    variants["all but first+last block"] = (everything.replace(keep_edge_blocks=1), None)
    variants["default + first+last block"] = (QuantConfig("fp8", keep_edge_blocks=1), None)
    data = {"label": label, "results": {}}
    lines = [f"exemptions {label}: DiT output rel L2 vs unquantized (share of weights quantized)",
             f"{'variant':30} " + " ".join(f"{s:>9}" for s in schemes) + f" {'weights':>8}"]
    total = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear))
    for vname, (base, filt) in variants.items():
        row = {}
        for scheme in schemes:
            cfg = base.replace(scheme=scheme)
            names = select_linears(model, cfg, filt)
            row[scheme] = quantization_error(model, cfg, run, names=names, per_layer=False, reference=ref).output_rel_l2
        share = sum(model.get_submodule(n).weight.numel() for n in names) / total
        data["results"][vname] = {**row, "linear_weight_share": share}
        lines.append(f"{vname:30} " + " ".join(f"{row[s]:9.4f}" for s in schemes) + f" {share:8.3f}")
    return AccuracyReport("\n".join(lines), data)


def measure_policies(model: nn.Module, *, inputs: dict[str, torch.Tensor] | None = None,
                     label: str = "") -> AccuracyReport:
    """The FP8 output error of the candidate override policies (all at ~1 byte/weight, so the same
    weight bytes): the previous default, + cross q/o on plain int8_wo, the current default, and the
    current one with one more layer kind on int8_wo_cs; plus cross-attention q/o alone on each
    weight-only scheme (its share of the error)."""
    inputs = inputs if inputs is not None else dit_inputs(model.cfg, device=next(model.parameters()).device)
    run = dit_runner(inputs)
    ref = run(model)
    qo = GROUPS["cross_attn_q_o"]
    variants = {
        "previous default (cross q/o fp8)": (QuantConfig("fp8", overrides=PREVIOUS_OVERRIDES), None),
        "previous + cross q/o int8_wo": (QuantConfig(
            "fp8", overrides=PREVIOUS_OVERRIDES + tuple((p, "int8_wo") for p in qo)), None),
        "default (q/o, k/v, face int8_wo_cs)": (QuantConfig("fp8"), None),
        "default + self_attn.o int8_wo_cs": (QuantConfig(
            "fp8", overrides=DEFAULT_OVERRIDES + (("blocks.*.self_attn.o", "int8_wo_cs"),)), None),
        "default + ffn.2 int8_wo_cs": (QuantConfig(
            "fp8", overrides=DEFAULT_OVERRIDES + (("blocks.*.ffn.2", "int8_wo_cs"),)), None),
        "only cross q/o, int8_wo": (QuantConfig("int8_wo", keep=(), overrides=()), _only(qo)),
        "only cross q/o, int8_wo_cs": (QuantConfig("int8_wo_cs", keep=(), overrides=()), _only(qo)),
    }
    data = {"label": label, "results": {}}
    lines = [f"policies {label}: FP8 DiT output rel L2 vs unquantized", f"{'variant':36} {'rel L2':>9}"]
    for vname, (cfg, filt) in variants.items():
        names = select_linears(model, cfg, filt)
        err = quantization_error(model, cfg, run, names=names, per_layer=False, reference=ref).output_rel_l2
        data["results"][vname] = err
        lines.append(f"{vname:36} {err:9.4f}")
    return AccuracyReport("\n".join(lines), data)


def _only(patterns):
    import fnmatch
    return lambda module, name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


__all__ = ["AccuracyReport", "QuantError", "accuracy_report", "checkpoint_accuracy_report", "dit_inputs",
           "reference_accuracy_report", "dit_runner", "inject_outliers",
           "measure_exemptions", "measure_policies", "quantization_error", "random_dit", "rel_l2", "summarize_layers"]
