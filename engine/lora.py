"""LoRA merging into DiT weights: W' = W + scale * (alpha / r) * B @ A, exact in fp32, rounded once.

Formats read (keys after an optional prefix: 'diffusion_model.', 'base_model.model.', 'model.',
'transformer.', 'lora_unet_'):
- PEFT (the official relighting LoRA; reference manifests/relighting_lora.json):
  `blocks.N.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r], optional adapter name
  (`lora_A.default.weight`). PEFT keeps alpha in its config, not the file: the relighting LoRA has
  rank 128, alpha 128, so scale 1, which is what a missing alpha means here.
- kohya / lightx2v / Kijai (the 4-step distillation LoRAs): `lora_down.weight` / `lora_up.weight`
  plus an optional `.alpha` scalar (scale alpha / rank), and full-tensor deltas: `<module>.diff`
  (added to `<module>.weight`), `<module>.diff_b` (to `.bias`), `blocks.N.diff_m` (to
  `blocks.N.modulation`). kohya's underscore names (`lora_unet_blocks_0_self_attn_q`) are resolved
  against the model's own module names.
- diffusers (`transformer.blocks.0.attn1.to_q.lora_A.weight`): module names go through
  engine/loader.py's diffusers -> official map; a face-adapter `to_k`/`to_v` LoRA lands on the
  K or V half of `linear1_kv`; `lora_B.bias` is a bias delta.
Every key must be understood and every target must exist in the model: anything else raises
CheckpointError naming the keys (PEFT itself would skip unknown keys silently).

Merging order with quantization: merge first, then quantize (quant/checkpoint.py does it tensor by
tensor while streaming). A LoRA merged into an already-quantized module is dequantized, merged and
requantized (QuantLinear.requantize), which adds a second rounding; prefer quantizing after merging.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from .errors import CheckpointError

PREFIXES = ("diffusion_model.", "base_model.model.", "model.", "transformer.", "lora_unet_")

_PAIR = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.(?P<leaf>weight|bias)$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_DIFF = re.compile(r"^(?P<module>.+)\.(?P<kind>diff|diff_b|diff_m)$")
_DOWN, _UP = ("lora_A", "lora_down"), ("lora_B", "lora_up")


@dataclass
class LowRank:
    down: torch.Tensor                    # A [r, in]
    up: torch.Tensor                      # B [out, r]
    alpha: float | None = None
    rows: int | None = None               # 0 / 1: only the first / second half of the rows (face-adapter K/V)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraPatch:
    """LoRA deltas keyed by the model parameter they change (`blocks.0.self_attn.q.weight`)."""
    low_rank: dict[str, list[LowRank]] = field(default_factory=dict)
    dense: dict[str, list[tuple[torch.Tensor, int | None]]] = field(default_factory=dict)
    scale: float = 1.0

    def targets(self) -> set[str]:
        return set(self.low_rank) | set(self.dense)

    def delta(self, param: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The fp32 delta to add to `param` (None when the LoRA does not touch it)."""
        if param not in self.low_rank and param not in self.dense:
            return None
        out = torch.zeros(shape, dtype=torch.float32)
        half = shape[0] // 2

        def part(rows):
            return out if rows is None else out[rows * half: (rows + 1) * half]

        for lr in self.low_rank.get(param, ()):
            d = lr.delta()
            target = part(lr.rows)
            if d.shape != target.shape:
                raise CheckpointError(f"LoRA for {param}: B @ A is {list(d.shape)}, the weight is {list(target.shape)}")
            target += d
        for t, rows in self.dense.get(param, ()):
            target = part(rows)
            if t.numel() != target.numel():
                raise CheckpointError(f"LoRA diff for {param}: {list(t.shape)} does not fit {list(target.shape)}")
            target += t.float().reshape(target.shape)
        return out * self.scale

    def apply(self, param: str, value: torch.Tensor) -> torch.Tensor:
        """value + delta, summed in fp32 and rounded once to value's dtype (value itself if untouched)."""
        d = self.delta(param, tuple(value.shape))
        if d is None:
            return value
        return (value.float() + d.to(value.device)).to(value.dtype)

    def __add__(self, other: "LoraPatch") -> "LoraPatch":
        """Several LoRAs at once (each keeps its own scale)."""
        out = LoraPatch()
        for p in (self, other):
            for k, v in p.low_rank.items():
                out.low_rank.setdefault(k, []).extend(LowRank(lr.down, lr.up * p.scale, lr.alpha, lr.rows) for lr in v)
            for k, v in p.dense.items():
                out.dense.setdefault(k, []).extend((t * p.scale, r) for t, r in v)
        return out


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA from .safetensors (pickles go through `wanimate convert` first: relighting_lora.ckpt
    becomes relighting_lora.safetensors)."""
    from .safetensors_io import read_header, read_tensors
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors only; run `wanimate convert` on the "
                              "checkpoint folder (it turns relighting_lora.ckpt into relighting_lora.safetensors)")
    return {k: v.clone() for k, v in read_tensors(read_header(path))}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _resolver(param_names: Iterable[str], cfg=None):
    """module name in any supported spelling -> (official module name, rows) or None."""
    params = set(param_names)
    modules = {p.rsplit(".", 1)[0] for p in params if "." in p}
    underscored = {m.replace(".", "_"): m for m in modules}

    def resolve(module: str):
        if module in modules or f"{module}.modulation" in params:
            return module, None
        if module in underscored:
            return underscored[module], None
        from .loader import diffusers_key_to_official
        n_res = cfg.motion_size.bit_length() - 3 if cfg is not None else 7
        official = diffusers_key_to_official(f"{module}.weight", n_res)
        if official is not None and official.endswith(".weight"):
            name = official[: -len(".weight")]
            if name.endswith(".linear1_kv"):
                return name, 0 if module.endswith(".to_k") else 1
            if name in modules:
                return name, None
        return None

    return resolve, params


def parse_lora(state: Mapping[str, torch.Tensor], param_names: Iterable[str], cfg=None,
               scale: float = 1.0) -> LoraPatch:
    """Group a LoRA state dict by the model parameter each key changes. `param_names`: the model's
    state-dict keys (official names); `cfg`: the DiTConfig (the motion-encoder depth of diffusers
    names; 14B's when None)."""
    resolve, params = _resolver(param_names, cfg)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    patch = LoraPatch(scale=scale)
    unknown = []
    for raw, t in state.items():
        key = _strip(raw)
        if m := _PAIR.match(key):
            pairs.setdefault((m["module"], m["leaf"]), {})[m["kind"]] = t
        elif m := _ALPHA.match(key):
            alphas[m["module"]] = float(t.float().item())
        elif m := _DIFF.match(key):
            found = resolve(m["module"])
            if found is None:
                unknown.append(raw)
                continue
            module, rows = found
            leaf = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}[m["kind"]]
            target = f"{module}.{leaf}"
            if target not in params:
                unknown.append(raw)
                continue
            patch.dense.setdefault(target, []).append((t, rows))
        else:
            unknown.append(raw)
    for (module, leaf), parts in pairs.items():
        found = resolve(module)
        if found is None:
            unknown.extend(f"{module}.{k}.{leaf}" for k in parts)
            continue
        name, rows = found
        down = next((parts[k] for k in _DOWN if k in parts), None)
        up = next((parts[k] for k in _UP if k in parts), None)
        if leaf == "bias":                      # diffusers lora_B.bias: a bias delta
            if up is None or f"{name}.bias" not in params:
                unknown.append(f"{module}.lora_B.bias")
                continue
            patch.dense.setdefault(f"{name}.bias", []).append((up, rows))
            continue
        if down is None or up is None:
            raise CheckpointError(f"LoRA for {module}: only one of the down/up (A/B) matrices is present ({sorted(parts)})")
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(f"LoRA for {module}: rank mismatch, A is {list(down.shape)}, B is {list(up.shape)}")
        if f"{name}.weight" not in params:
            unknown.append(f"{module}.lora (no weight {name}.weight in the model)")
            continue
        patch.low_rank.setdefault(f"{name}.weight", []).append(LowRank(down, up, alphas.pop(module, None), rows))
    unknown += [f"{m}.alpha" for m in alphas if not any(m == k[0] for k in pairs)]
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise CheckpointError(f"LoRA keys that match no DiT parameter: {shown}. Supported: PEFT lora_A/lora_B, "
                              "kohya lora_down/lora_up(+alpha, diff, diff_b, diff_m), diffusers attn1/attn2 names, "
                              f"with prefixes {PREFIXES}")
    return patch


def merge_lora(model_or_state: nn.Module | dict[str, torch.Tensor], lora_state: Mapping[str, torch.Tensor] | LoraPatch,
               scale: float = 1.0, cfg=None):
    """Merge a LoRA into a model (in place; returns it) or a state dict (returns a new dict sharing
    the untouched tensors). Each target becomes round(W + scale * delta) with the sum in fp32.
    Quantized modules (quant/) are dequantized, merged and requantized."""
    if isinstance(model_or_state, nn.Module):
        model = model_or_state
        cfg = cfg if cfg is not None else getattr(model, "cfg", None)
        names = _model_param_names(model)
        patch = lora_state if isinstance(lora_state, LoraPatch) else parse_lora(lora_state, names, cfg, scale)
        if isinstance(lora_state, LoraPatch) and scale != 1.0:
            patch = LoraPatch(patch.low_rank, patch.dense, patch.scale * scale)
        with torch.no_grad():
            for target in sorted(patch.targets()):
                _merge_into_module(model, target, patch)
        return model
    state = dict(model_or_state)
    patch = lora_state if isinstance(lora_state, LoraPatch) else parse_lora(lora_state, state.keys(), cfg, scale)
    for target in patch.targets():
        state[target] = patch.apply(target, state[target])
    return state


def _model_param_names(model: nn.Module) -> list[str]:
    """State-dict names, with quantized linears reported as `<name>.weight` (their logical weight)."""
    from ..quant.registry import QuantLinear
    names = list(model.state_dict().keys())
    names += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    return names


def _merge_into_module(model: nn.Module, target: str, patch: LoraPatch) -> None:
    from ..quant.registry import QuantLinear
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QuantLinear) and leaf == "weight":
        w = module.dequantize()
        module.requantize(w + patch.delta(target, tuple(w.shape)).to(w.device))
        return
    tensor = getattr(module, leaf)
    tensor.copy_(patch.apply(target, tensor.detach()))
