"""Checkpoint loading: the official layout and the diffusers layout into one module.

Loading = build on the meta device, map every checkpoint key through a strict, explicit name map,
validate everything that can be validated before any data moves (keys, shapes, dtypes, file
integrity), then stream shard by shard: read one file (hashing it against the manifest when one
exists), check values (NaN/Inf), convert to the target dtype, move to the device and
`load_state_dict(assign=True)`. Host memory stays near one shard. On any error the partially
built module is dropped, so nothing is left half-loaded.

Layouts (reference NOTES §1, §15):
- official: `config.json` + `diffusion_pytorch_model*.safetensors` (+ `.index.json`) at the
  checkpoint root; keys are this engine's own parameter names.
- diffusers: `transformer/` with the same file names; keys mapped by `diffusers_to_official`.
`.pth` files are never unpickled here: `wanimate convert` (engine/convert.py) turns them into
safetensors once, in a subprocess, and writes the manifest these loaders check.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from .config import DiTConfig
from .errors import CheckpointError
from .model import Blur, WanAnimateDiT
from .safetensors_io import read_header, read_manifest, read_tensors

DIT_WEIGHTS = "diffusion_pytorch_model"


# ----------------------------------------------------------------------------------------------
# Name maps: diffusers <-> official (reference NOTES §15.3). Each rule maps one key pattern.

_DIFFUSERS_RENAMES: list[tuple[str, str]] = [
    # (diffusers regex, official replacement)
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.self_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.self_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_q\.", r"blocks.\1.cross_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn2\.norm_k\.", r"blocks.\1.cross_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    # diffusers swaps the names of the cross-attention norm (affine) and the FFN norm (no params)
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(patch_embedding|pose_patch_embedding)\.", r"\1."),
    (r"^motion_encoder\.conv_in\.weight$", "motion_encoder.enc.net_app.convs.0.0.weight"),
    (r"^motion_encoder\.conv_in\.act_fn\.bias$", "motion_encoder.enc.net_app.convs.0.1.bias"),
    (r"^motion_encoder\.conv_out\.weight$", "MOTION_CONV_OUT"),      # index depends on the size
    (r"^motion_encoder\.motion_network\.(\d+)\.", r"motion_encoder.enc.fc.\1."),
    (r"^motion_encoder\.motion_synthesis_weight$", "motion_encoder.dec.direction.weight"),
    (r"^face_encoder\.(conv1_local|conv2|conv3)\.", r"face_encoder.\1.conv."),
    (r"^face_encoder\.(out_proj|padding_tokens)", r"face_encoder.\1"),
    (r"^face_adapter\.(\d+)\.to_q\.", r"face_adapter.fuser_blocks.\1.linear1_q."),
    (r"^face_adapter\.(\d+)\.to_out\.", r"face_adapter.fuser_blocks.\1.linear2."),
    (r"^face_adapter\.(\d+)\.norm_q\.", r"face_adapter.fuser_blocks.\1.q_norm."),
    (r"^face_adapter\.(\d+)\.norm_k\.", r"face_adapter.fuser_blocks.\1.k_norm."),
]
_RES_BLOCK = re.compile(r"^motion_encoder\.res_blocks\.(\d+)\.(conv1|conv2|conv_skip)\.(weight|act_fn\.bias)$")
_FACE_KV = re.compile(r"^face_adapter\.(\d+)\.(to_k|to_v)\.(weight|bias)$")
_LEAKY_BIAS = re.compile(r"^motion_encoder\.enc\.net_app\.convs\.\d+\.(1|conv1\.1|conv2\.2)\.bias$")


def diffusers_key_to_official(key: str, n_res_blocks: int) -> str | None:
    """One diffusers key -> its official name. Returns None for unknown keys. `face_adapter.K.to_k`
    and `to_v` map to the same official `linear1_kv` (rows 0:dim and dim:2dim); callers merge them."""
    if m := _RES_BLOCK.match(key):
        n, layer, kind = int(m[1]) + 1, m[2], m[3]
        base = f"motion_encoder.enc.net_app.convs.{n}"
        return {("conv1", "weight"): f"{base}.conv1.0.weight", ("conv1", "act_fn.bias"): f"{base}.conv1.1.bias",
                ("conv2", "weight"): f"{base}.conv2.1.weight", ("conv2", "act_fn.bias"): f"{base}.conv2.2.bias",
                ("conv_skip", "weight"): f"{base}.skip.1.weight"}.get((layer, kind))
    if m := _FACE_KV.match(key):
        return f"face_adapter.fuser_blocks.{m[1]}.linear1_kv.{m[3]}"
    for pattern, repl in _DIFFUSERS_RENAMES:
        if re.search(pattern, key):
            out = re.sub(pattern, repl, key)
            if out == "MOTION_CONV_OUT":
                return f"motion_encoder.enc.net_app.convs.{n_res_blocks + 1}.weight"
            return out
    return None


def diffusers_to_official(tensors: Iterable[tuple[str, torch.Tensor]], cfg: DiTConfig,
                          pending: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Map (diffusers key, tensor) pairs to official ones. Shapes follow the official layout:
    [C] LeakyReLU biases become [1, C, 1, 1]; face-adapter to_k/to_v are stacked into linear1_kv.
    `pending` holds a to_k or to_v half until its partner arrives (they may sit in different shards)."""
    pending = {} if pending is None else pending
    n_res = _n_res_blocks(cfg)
    for key, t in tensors:
        name = diffusers_key_to_official(key, n_res)
        if name is None:
            raise CheckpointError(f"unexpected diffusers key {key!r}: no official name maps to it")
        if _LEAKY_BIAS.match(name):                      # diffusers stores these as [C]
            t = t.reshape(1, -1, 1, 1)
        if ".linear1_kv." in name:
            half = "k" if ".to_k." in key else "v"
            other = pending.pop((name, "v" if half == "k" else "k"), None)
            if other is None:
                pending[(name, half)] = t
                continue
            k, v = (t, other) if half == "k" else (other, t)
            t = torch.cat([k, v], dim=0)
        yield name, t


def official_to_diffusers(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The inverse map (for tests and export): official state dict -> diffusers state dict.
    The blur-kernel buffers are dropped (diffusers rebuilds them)."""
    n_res = _n_res_blocks(cfg)
    inverse = {}
    for dkey in diffusers_keys(cfg):
        inverse.setdefault(diffusers_key_to_official(dkey, n_res), []).append(dkey)
    out = {}
    for name, t in state.items():
        if name.endswith(".kernel"):
            continue
        targets = inverse.get(name)
        if targets is None:
            raise CheckpointError(f"official key {name!r} has no diffusers name")
        if ".linear1_kv." in name:
            k, v = t.chunk(2, dim=0)
            for dkey in targets:
                out[dkey] = (k if ".to_k." in dkey else v).contiguous()
            continue
        (dkey,) = targets
        out[dkey] = t.reshape(-1) if t.dim() == 4 and dkey.endswith("act_fn.bias") else t
    return out


def _n_res_blocks(cfg: DiTConfig) -> int:
    return cfg.motion_size.bit_length() - 3          # 512 -> 7 blocks down to 4x4


def diffusers_keys(cfg: DiTConfig) -> list[str]:
    """The diffusers WanAnimateTransformer3DModel keys for a config (no diffusers import)."""
    keys = ["scale_shift_table", "patch_embedding.weight", "patch_embedding.bias",
            "pose_patch_embedding.weight", "pose_patch_embedding.bias",
            "proj_out.weight", "proj_out.bias"]
    for lin in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1",
                "text_embedder.linear_2", "image_embedder.norm1", "image_embedder.ff.net.0.proj",
                "image_embedder.ff.net.2", "image_embedder.norm2"):
        keys += [f"condition_embedder.{lin}.weight", f"condition_embedder.{lin}.bias"]
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        keys += [f"{b}.scale_shift_table", f"{b}.norm2.weight", f"{b}.norm2.bias"]
        for attn, projs in (("attn1", ("to_q", "to_k", "to_v", "to_out.0")),
                            ("attn2", ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"))):
            for p in projs:
                keys += [f"{b}.{attn}.{p}.weight", f"{b}.{attn}.{p}.bias"]
            keys += [f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"]
        keys += [f"{b}.attn2.norm_added_k.weight"]
        keys += [f"{b}.ffn.net.0.proj.weight", f"{b}.ffn.net.0.proj.bias", f"{b}.ffn.net.2.weight", f"{b}.ffn.net.2.bias"]
    keys += ["motion_encoder.conv_in.weight", "motion_encoder.conv_in.act_fn.bias", "motion_encoder.conv_out.weight",
             "motion_encoder.motion_synthesis_weight"]
    for n in range(_n_res_blocks(cfg)):
        r = f"motion_encoder.res_blocks.{n}"
        keys += [f"{r}.conv1.weight", f"{r}.conv1.act_fn.bias", f"{r}.conv2.weight", f"{r}.conv2.act_fn.bias",
                 f"{r}.conv_skip.weight"]
    for n in range(5):
        keys += [f"motion_encoder.motion_network.{n}.weight", f"motion_encoder.motion_network.{n}.bias"]
    for c in ("conv1_local", "conv2", "conv3", "out_proj"):
        keys += [f"face_encoder.{c}.weight", f"face_encoder.{c}.bias"]
    keys += ["face_encoder.padding_tokens"]
    for k in range(cfg.num_face_blocks):
        for p in ("to_q", "to_k", "to_v", "to_out"):
            keys += [f"face_adapter.{k}.{p}.weight", f"face_adapter.{k}.{p}.bias"]
        keys += [f"face_adapter.{k}.norm_q.weight", f"face_adapter.{k}.norm_k.weight"]
    return keys


def dit_config_from_diffusers(config: dict) -> DiTConfig:
    """diffusers WanAnimateTransformer3DModel config.json -> DiTConfig (strict about what differs)."""
    from .errors import ValidationError
    dim = config.get("num_attention_heads", 40) * config.get("attention_head_dim", 128)
    if config.get("added_kv_proj_dim") not in (dim,):
        raise CheckpointError(f"diffusers config added_kv_proj_dim={config.get('added_kv_proj_dim')} must equal the "
                              f"model width {dim}: without it the 257 CLIP tokens have no key/value projections")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not config.get("cross_attn_norm", True):
        raise CheckpointError("only qk_norm='rms_norm_across_heads' with cross_attn_norm=True is a Wan-Animate model")
    if config.get("motion_style_dim", 512) != config.get("motion_encoder_dim", 512):
        raise CheckpointError("motion_style_dim must equal motion_encoder_dim (both 512 in Wan-Animate)")
    size = config.get("motion_encoder_size", 512)
    channels = config.get("motion_encoder_channel_sizes") or None
    width = int(channels["4"]) if channels else 512
    cfg = DiTConfig(dim=dim, ffn_dim=config.get("ffn_dim", 13824), num_heads=config.get("num_attention_heads", 40),
                    num_layers=config.get("num_layers", 40), in_dim=config.get("in_channels", 36),
                    out_dim=config.get("out_channels", 16), patch_size=tuple(config.get("patch_size", (1, 2, 2))),
                    text_dim=config.get("text_dim", 4096), freq_dim=config.get("freq_dim", 256),
                    eps=config.get("eps", 1e-6), image_dim=config.get("image_dim", 1280),
                    motion_size=size, motion_width=width, motion_encoder_dim=config.get("motion_encoder_dim", 512),
                    motion_dim=config.get("motion_dim", 20), face_hidden=config.get("face_encoder_hidden_dim", 1024),
                    face_heads=config.get("face_encoder_num_heads", 4),
                    face_adapter_every=config.get("inject_face_latents_blocks", 5),
                    rope_max_len=config.get("rope_max_seq_len", 1024))
    if channels:
        for r, c in channels.items():
            if int(r) <= size and cfg.motion_channels(int(r)) != int(c):
                raise ValidationError(f"motion_encoder_channel_sizes[{r}]={c} does not follow the LIA ladder "
                                      f"(expected {cfg.motion_channels(int(r))})")
    return cfg


def diffusers_config(cfg: DiTConfig) -> dict:
    """DiTConfig -> a diffusers WanAnimateTransformer3DModel config (the inverse of the above)."""
    return {"_class_name": "WanAnimateTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim,
            "latent_channels": cfg.pose_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": cfg.image_dim,
            "added_kv_proj_dim": cfg.dim, "rope_max_seq_len": cfg.rope_max_len,
            "motion_encoder_channel_sizes": {str(2 ** i): cfg.motion_channels(2 ** i) for i in range(2, 11)},
            "motion_encoder_size": cfg.motion_size, "motion_style_dim": cfg.motion_encoder_dim,
            "motion_dim": cfg.motion_dim, "motion_encoder_dim": cfg.motion_encoder_dim,
            "face_encoder_hidden_dim": cfg.face_hidden, "face_encoder_num_heads": cfg.face_heads,
            "inject_face_latents_blocks": cfg.face_adapter_every}


# ----------------------------------------------------------------------------------------------
# Building and filling a module


def build_dit(cfg: DiTConfig) -> WanAnimateDiT:
    """The DiT on the meta device: no memory until weights are assigned."""
    with torch.device("meta"):
        return WanAnimateDiT(cfg)


def constant_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers whose values the module defines (the motion encoder's blur kernels)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Blur):
            k = torch.tensor([1.0, 3.0, 3.0, 1.0])
            out[f"{name}.kernel"] = torch.outer(k, k) / 64.0
    return out


def expected_entries(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key a checkpoint must provide: parameters and persistent buffers."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)      # (key, file)
    shape: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # key, file, expected, found
    dtype: list[tuple[str, str, str]] = field(default_factory=list)      # key, file, found dtype

    def raise_if_any(self, what: str) -> None:
        lines = []
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): " + ", ".join(f"{k} [{f}]" for k, f in self.unexpected))
        if self.shape:
            lines.append("shape mismatches: " + ", ".join(f"{k} [{f}] expected {list(e)} found {list(s)}" for k, f, e, s in self.shape))
        if self.dtype:
            lines.append("unsupported dtypes: " + ", ".join(f"{k} [{f}] {d}" for k, f, d in self.dtype))
        if lines:
            raise CheckpointError(f"{what} does not match the model:\n  " + "\n  ".join(lines))


LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_finite(name: str, t: torch.Tensor, file: str) -> None:
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{file}: tensor {name!r} holds {n} NaN/Inf values; the checkpoint is corrupt")


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """What load_state_dict(assign=True) does for one key, without walking the whole module tree."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


def assign_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                   device: torch.device | str = "cpu", source: str = "state dict") -> nn.Module:
    """Strictly fill a meta-built module from (name, tensor) pairs, tensor by tensor: each is
    checked (known key, seen once, shape, finite) on the CPU before it moves to `device` as `dtype`.
    Buffers the module defines itself (blur kernels) may be absent; if present they must hold the
    defined values. Every other parameter must be provided."""
    expected = expected_entries(model)
    constants = constant_buffers(model)
    seen: set[str] = set()
    for name, t in tensors:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected key {name!r}")
        if name in seen:
            raise CheckpointError(f"{source}: key {name!r} appears twice")
        shape, _ = expected[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: {name}: expected shape {list(shape)}, found {list(t.shape)}")
        check_finite(name, t, source)
        if name in constants and not torch.equal(t.float(), constants[name]):
            raise CheckpointError(f"{source}: {name} should be the fixed blur kernel outer([1,3,3,1])^2/64")
        _assign(model, name, t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype))
        seen.add(name)
    for name, value in constants.items():
        if name not in seen:
            _assign(model, name, value.to(device=device, dtype=dtype))
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{source}: missing keys ({len(missing)}): {', '.join(missing)}")
    return model


# ----------------------------------------------------------------------------------------------
# The DiT from a checkpoint directory


@dataclass(frozen=True)
class DiTCheckpoint:
    layout: str                  # "official" | "diffusers"
    directory: Path              # where the shards are
    files: list[Path]
    config: DiTConfig


def find_dit(ckpt_dir: Path) -> DiTCheckpoint:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory; pass the Wan2.2-Animate-14B checkpoint folder")
    for layout, directory in (("official", ckpt_dir), ("diffusers", ckpt_dir / "transformer")):
        index = directory / f"{DIT_WEIGHTS}.safetensors.index.json"
        single = directory / f"{DIT_WEIGHTS}.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            files = sorted({directory / f for f in weight_map.values()})
        elif single.exists():
            files = [single]
        else:
            continue
        cfg_path = directory / "config.json"
        raw = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if layout == "official":
            config = DiTConfig.from_official(raw)
        else:
            config = dit_config_from_diffusers(raw)
        return DiTCheckpoint(layout, directory, files, config)
    raise CheckpointError(f"{ckpt_dir}: no DiT weights found: expected {DIT_WEIGHTS}*.safetensors (+ index) at the "
                          f"root (official layout) or in transformer/ (diffusers layout)")


def validate_dit_files(ck: DiTCheckpoint, model: nn.Module) -> None:
    """Everything checkable from headers alone, for all shards, before any data is read:
    file integrity, overlapping keys across shards, missing/unexpected keys, shapes, dtypes."""
    headers = [read_header(f) for f in ck.files]
    owner: dict[str, str] = {}
    report = KeyReport()
    expected = expected_entries(model)
    cfg = ck.config
    n_res = _n_res_blocks(cfg)
    provided: dict[str, list[tuple[str, str, tuple]]] = {}
    for h in headers:
        for key, info in h.tensors.items():
            if key in owner:
                raise CheckpointError(f"key {key!r} is stored in two shards: {owner[key]} and {h.path.name}")
            owner[key] = h.path.name
            name = key if ck.layout == "official" else diffusers_key_to_official(key, n_res)
            if name is None or name not in expected:
                report.unexpected.append((key, h.path.name))
                continue
            if info.dtype not in LOADABLE_DTYPES:
                report.dtype.append((key, h.path.name, str(info.dtype)))
            provided.setdefault(name, []).append((key, h.path.name, info.shape))
    for name, (shape, _) in expected.items():
        got = provided.get(name)
        if not got:
            if name not in constant_buffers_names(model):
                report.missing.append(name)
            continue
        if ".linear1_kv." in name and ck.layout == "diffusers":
            found = (sum(s[0] for _, _, s in got),) + tuple(got[0][2][1:])
            if len(got) != 2:
                report.missing.append(name + " (to_k and to_v)")
                continue
        else:
            found = got[0][2]
        if ck.layout == "diffusers" and len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1):
            found = (1, found[0], 1, 1) if len(found) == 1 else found
        if tuple(found) != tuple(shape):
            report.shape.append((name, got[0][1], shape, tuple(found)))
    report.raise_if_any(f"checkpoint {ck.directory} ({ck.layout} layout)")


def constant_buffers_names(model: nn.Module) -> set[str]:
    return set(constant_buffers(model))


def load_dit(ckpt_dir: Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
             progress: Callable[[str], None] | None = None, lora=None) -> WanAnimateDiT:
    """Load the DiT from an official or diffusers checkpoint directory (see the module docstring).
    `lora` (an engine.lora.LoraPatch) is merged tensor by tensor on the CPU as the shards stream
    in: W + delta summed in fp32 and rounded once, so no full-precision copy of the model exists."""
    ck = find_dit(ckpt_dir)
    model = build_dit(ck.config)
    validate_dit_files(ck, model)
    manifest = read_manifest(Path(ckpt_dir)) or {}
    pending: dict = {}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for i, f in enumerate(ck.files):
            if progress:
                progress(f"loading {f.name} ({i + 1}/{len(ck.files)})")
            rel = str(f.relative_to(Path(ckpt_dir)))
            digest = manifest.get(rel, {}).get("sha256")
            pairs = read_tensors(read_header(f), expected_sha256=digest)
            yield from (pairs if ck.layout == "official" else diffusers_to_official(pairs, ck.config, pending))

    pairs = stream() if lora is None else ((k, lora.apply(k, t)) for k, t in stream())
    try:
        assign_weights(model, pairs, dtype=dtype, device=device, source=str(ck.directory))
    except BaseException:
        model = None        # the traceback keeps this frame alive: drop the half-loaded module
        raise
    if pending:
        raise CheckpointError(f"{ck.directory}: face-adapter halves without a partner: {sorted(k for k, _ in pending)}")
    return model.eval().requires_grad_(False)


def load_dit_state_dict(cfg: DiTConfig, state: dict[str, torch.Tensor], *, dtype=torch.float32, device="cpu",
                        layout: str = "official") -> WanAnimateDiT:
    """Build from an in-memory state dict (tests, the recipe-built embedded default)."""
    model = build_dit(cfg)
    pairs = state.items() if layout == "official" else diffusers_to_official(state.items(), cfg)
    return assign_weights(model, pairs, dtype=dtype, device=device, source=f"{layout} state dict").eval().requires_grad_(False)


def recipe_dit(cfg: DiTConfig, base_seed: int, *, live_face_path: bool = True, dtype=torch.float32,
               device="cpu") -> WanAnimateDiT:
    """A DiT whose weights come from the fixtures' recipe. `live_face_path` draws the motion
    encoder's equalized-LR weights at unit scale (the e2e fixtures' exception), without which the
    face signal vanishes (fixtures README, dit_fp32_motion)."""
    from . import recipe
    model = build_dit(cfg)
    shapes = {k: s for k, (s, _) in expected_entries(model).items() if k not in constant_buffers(model)}
    unscaled = recipe.equal_lr_keys(shapes) if live_face_path else ()
    state = recipe.state_dict_for(shapes, base_seed, unscaled=unscaled)
    return assign_weights(model, state.items(), dtype=dtype, device=device, source="recipe").eval().requires_grad_(False)
