"""Fixture runner, kind `t5`: the umT5 encoder against the official T5Encoder.

The fixture names `wan.modules.t5.umt5_xxl(encoder_only=True, **overrides)`; everything the
overrides do not set is umT5-XXL's fixed structure (per-layer bidirectional position bias,
max distance 128). Weights = recipe(key, shape, base_seed) over this engine's (= the official)
keys. Checks: fp32 hidden states at every position, what the pipeline keeps (seq_lens, the
zero-padded DiT context), the position buckets, and a bf16 run (the official's precision)
bounded by the bf16 error the fixture recorded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import recipe
from ..config import T5Config
from ..errors import FixtureError
from ..text import T5Encoder, pipeline_context, relative_position_bucket
from . import Check, compare

FP32_REL = 1e-4
# The bf16 run may be at most this many times further from fp32 than the official bf16 run was.
BF16_FACTOR = 1.5

# umt5_xxl argument -> T5Config field
_OVERRIDES = {"vocab_size": "vocab_size", "dim": "dim", "dim_attn": "dim_attn", "dim_ffn": "dim_ffn",
              "num_heads": "num_heads", "encoder_layers": "num_layers", "num_layers": "num_layers",
              "num_buckets": "num_buckets"}
# umt5_xxl arguments that have no effect on an eval-mode encoder
_INERT = {"decoder_layers", "dropout"}


def config_from_overrides(overrides: dict, text_len: int) -> T5Config:
    """T5Config for `umt5_xxl(encoder_only=True, **overrides)`."""
    kwargs = {}
    for key, value in overrides.items():
        if key in _OVERRIDES:
            kwargs[_OVERRIDES[key]] = int(value)
        elif key == "shared_pos":
            if value:
                raise FixtureError("shared_pos=True (one position bias for all layers) is not umT5's "
                                   "structure and is not supported")
        elif key not in _INERT:
            raise FixtureError(f"unsupported umt5_xxl override {key}={value!r}")
    return T5Config(text_len=text_len, **kwargs)


def build(config: T5Config, base_seed: int) -> T5Encoder:
    model = T5Encoder(config).eval().requires_grad_(False)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(recipe.state_dict_for(shapes, base_seed), strict=True)
    return model


def _real_rows(x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    return torch.cat([x[i, :n] for i, n in enumerate(seq_lens)])           # [sum(len_i), dim]


def run(path: Path, meta: dict, **options) -> list[Check]:
    name = path.stem
    data = path.with_suffix(".safetensors")
    if not data.exists():
        raise FixtureError(f"{data} is missing")
    tensors = load_file(str(data))
    call = meta.get("call", {})
    ids, mask = tensors["input.ids"], tensors["input.mask"]
    text_len = int(call.get("text_len", ids.shape[1]))
    model = build(config_from_overrides(call.get("overrides", {}), text_len), int(meta["base_seed"]))

    checks = []
    with torch.inference_mode():
        hidden = model.encode(ids, mask)
    checks.append(compare(name, "output.hidden", hidden, tensors["output.hidden"], rel_tol=FP32_REL))
    ctx = pipeline_context(hidden, mask, text_len)
    checks.append(compare(name, "output.seq_lens", ctx.seq_lens, tensors["output.seq_lens"]))
    checks.append(compare(name, "output.context_padded", ctx.padded, tensors["output.context_padded"],
                          rel_tol=FP32_REL))
    if "inter.rel_pos_bucket" in tensors:
        ref = tensors["inter.rel_pos_bucket"]
        got = relative_position_bucket(ref.shape[0], ref.shape[1], model.config.num_buckets,
                                       model.config.max_distance).to(ref.dtype)
        checks.append(compare(name, "inter.rel_pos_bucket", got, ref))

    if "output.hidden_bf16" in tensors:
        recorded = float(meta["error_bf16_vs_fp32"]["rel_l2_bf16_vs_fp32_real_tokens"])
        bound = BF16_FACTOR * recorded
        model = model.to(torch.bfloat16)
        with torch.inference_mode():
            hidden_bf16 = model.encode(ids, mask).float()
        lens = ctx.seq_lens.tolist()
        # Padded positions are discarded by the pipeline; the recorded error covers real tokens.
        checks.append(compare(
            name, "output.hidden_bf16", _real_rows(hidden_bf16, lens),
            _real_rows(tensors["output.hidden"], lens), rel_tol=bound,
            note=f"bf16 run vs fp32 reference, real tokens; official bf16 error {recorded:.3e}"))
        checks.append(compare(
            name, "output.hidden_bf16 (vs official bf16)", _real_rows(hidden_bf16, lens),
            _real_rows(tensors["output.hidden_bf16"], lens), rel_tol=bound,
            note="bf16 run vs the official bf16 run, real tokens"))
    return checks
