"""Text conditioning: the umT5-XXL encoder and its tokenizers.

The DiT's cross-attention reads the prompt as umT5-XXL encoder states (reference NOTES §1, §5):

    prompt ─► clean (ftfy, html unescape, collapse whitespace) ─► tokenize, EOS, pad to 512
           ─► T5Encoder(ids, mask)                        [B, 512, 4096]
           ─► keep rows [:len_i] of each prompt           list of [len_i, 4096]
           ─► the DiT zero-pads each back to 512 rows     [B, 512, 4096], pad rows exactly 0

The encoder is T5 v1.1 as umT5 uses it: pre-norm blocks with an RMS norm (no mean, no bias), attention
without the 1/sqrt(d) factor (folded into the trained weights), a gated-GELU(tanh) feed-forward,
and a relative-position bias that every layer owns (umT5's shared_pos=False) rather than one shared
by all layers as in the original T5. Padded keys are masked; padded queries still get outputs,
which the pipeline throws away.

Parameter names are the official checkpoint's (models_t5_umt5-xxl-enc-bf16.pth; manifests/t5.json),
so that file loads with an identity key map. `hf_umt5_to_official` renames a transformers
UMT5EncoderModel state dict (the -Diffusers layout's text_encoder/) to those names.

Precision: the official pipeline runs this model in bf16 with no autocast (NOTES §10): weights and
activations bf16, the RMS statistic in fp32, the attention softmax in fp32. Casting the module to
bf16 reproduces that; fp32 is the reference path.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config
from .errors import CheckpointError, ValidationError


# ---------------------------------------------------------------------------------------------
# Relative position buckets


def relative_position_bucket(query_len: int, key_len: int, num_buckets: int = 32,
                             max_distance: int = 128, device=None) -> torch.Tensor:
    """Bucket index [query_len, key_len] (int64) of the offset key - query, bidirectional.

    Half the buckets hold positive offsets, half the rest (zero included). Within each half the
    first num_buckets/4 offsets get a bucket each; larger offsets share log-spaced buckets up to
    max_distance, beyond which everything lands in the last bucket. The float32 log arithmetic
    is kept as in the official code: bucket boundaries come from truncating it, so a different
    rounding path would move offsets across boundaries.
    """
    offset = (torch.arange(key_len, device=device)[None, :]
              - torch.arange(query_len, device=device)[:, None])          # [Lq, Lk]
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


# ---------------------------------------------------------------------------------------------
# Modules (parameter names follow the official checkpoint)


class T5LayerNorm(nn.Module):
    """RMS norm: x / rms(x) * weight. The statistic is always computed in fp32; the result is
    cast back to the weight dtype before the scale, as the official bf16 run does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class T5RelativeEmbedding(nn.Module):
    """One learned bias per (bucket, head)."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        bias = self.embedding(buckets)                                    # [Lq, Lk, H]
        return bias.permute(2, 0, 1).unsqueeze(0)                         # [1, H, Lq, Lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValidationError(f"T5 dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B, H, L, L] = position bias with masked keys at finfo.min."""
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.num_heads, -1).transpose(1, 2)   # [B, H, L, D]
        k = self.k(x).view(b, length, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, length, self.num_heads, -1).transpose(1, 2)
        # No 1/sqrt(D): T5's trained weights already carry it. The logits and the bias are summed
        # in the compute dtype and only the softmax runs in fp32, as in the official bf16 run.
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias               # [B, H, L, L]
        probs = logits.float().softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)                                       # [B, H, L, D]
        return self.o(out.transpose(1, 2).reshape(b, length, -1))          # [B, L, dim]


class TanhGELU(nn.Module):
    """GELU, tanh approximation, written out op by op rather than F.gelu(approximate='tanh').

    In fp32 the two agree to rounding. In bf16 the official computes each step in bf16, and this
    form reproduces that exactly (measured: the bf16 encoder output then equals the official bf16
    fixture bit for bit on real tokens; with the fused F.gelu it differs by rel L2 1.2e-2).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))). `gate` is a Sequential so its weight is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim, config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5LayerNorm(config.dim, config.eps)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(config.num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        # Padded keys get the most negative finite value (not -inf) so that softmax stays finite.
        bias = self.pos_embedding(buckets).to(x.dtype)                     # [1, H, L, L]
        bias = bias.masked_fill(key_pad[:, None, None, :], torch.finfo(x.dtype).min)  # [B, H, L, L]
        x = x + self.attn(self.norm1(x), bias)
        x = x + self.ffn(self.norm2(x))
        return x


class T5Encoder(nn.Module):
    """umT5 encoder: token embedding, `num_layers` blocks with their own position bias, final norm.

    Built from a T5Config (`14b` = umT5-XXL: 256384 vocab, 4096 wide, 64 heads, 24 layers).
    State-dict keys equal the official checkpoint's.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        if config.num_layers < 1 or config.num_buckets < 4 or config.num_buckets % 4 \
                or config.max_distance <= config.num_buckets // 4:
            raise ValidationError(
                f"T5 needs num_layers >= 1, num_buckets a positive multiple of 4 and max_distance > "
                f"num_buckets/4 (got {config.num_layers}, {config.num_buckets}, {config.max_distance})")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode(ids, mask)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (nonzero = real token) -> hidden [B, L, dim] in the
        module's dtype, every position included (padded positions are computed, not zeroed)."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValidationError(
                f"T5 expects ids and mask of one shape [batch, length]; got {tuple(ids.shape)} "
                f"and {tuple(mask.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValidationError(f"T5 token ids must be int64 (got {ids.dtype})")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValidationError(
                f"token ids must lie in [0, {self.config.vocab_size}); got "
                f"[{int(ids.min())}, {int(ids.max())}]: the tokenizer does not match this T5")
        length = ids.shape[1]
        buckets = relative_position_bucket(length, length, self.config.num_buckets,
                                           self.config.max_distance, device=ids.device)
        key_pad = mask == 0                                                 # [B, L]
        x = self.token_embedding(ids)                                       # [B, L, dim]
        for block in self.blocks:
            x = block(x, buckets, key_pad)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# What the pipeline keeps


@dataclass
class TextContext:
    """The prompt encoding in the two forms the pipeline uses.

    trimmed: per prompt, the rows of its real tokens (EOS included), [len_i, dim]; what the official
             T5EncoderModel returns.
    padded:  [B, text_len, dim]: trimmed rows followed by exact zeros, what the DiT's text embedding
             reads (WanAnimateModel pads the list itself; the zero rows are attended to unmasked).
    seq_lens: [B] int64, the number of real tokens per prompt.
    """
    trimmed: list[torch.Tensor]
    padded: torch.Tensor
    seq_lens: torch.Tensor


def pipeline_context(hidden: torch.Tensor, mask: torch.Tensor, text_len: int = 512) -> TextContext:
    """Cut each row of `hidden` [B, L, dim] to its real length (mask > 0) and zero-pad to text_len."""
    seq_lens = mask.gt(0).sum(dim=1).long()
    longest = int(seq_lens.max()) if seq_lens.numel() else 0
    if longest > text_len:
        raise ValidationError(f"a prompt has {longest} tokens but the DiT reads at most {text_len}; "
                              "tokenize with truncation to text_len")
    trimmed = [h[:n] for h, n in zip(hidden, seq_lens.tolist())]
    padded = hidden.new_zeros(hidden.shape[0], text_len, hidden.shape[2])
    for i, rows in enumerate(trimmed):
        padded[i, :rows.shape[0]] = rows
    return TextContext(trimmed, padded, seq_lens)


def encode_text(model: T5Encoder, tokenizer, prompts: Sequence[str] | str,
                text_len: int | None = None) -> TextContext:
    """Tokenize, encode and trim/pad: the whole text branch of the pipeline."""
    ids, mask = tokenizer(prompts)
    device = model.token_embedding.weight.device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():       # not inference_mode: callers may still write into the result
        hidden = model.encode(ids, mask)
    return pipeline_context(hidden, mask, text_len or model.config.text_len)


# ---------------------------------------------------------------------------------------------
# Tokenizers: both map a list of prompts to (ids [B, text_len] int64, mask [B, text_len] int64)


def whitespace_clean(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy.fix_text, html unescape twice, strip, then every
    whitespace run -> one space.

    ftfy is a real dependency, not replicated: besides mojibake repair it maps fullwidth forms to
    ASCII (the default Chinese prompts' '，' becomes ','), straightens curly quotes, splits
    ligatures and drops control characters, and the token ids change with each of those.
    `regex` (not `re`) because its \\s is the Unicode White_Space set the official uses.
    """
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _as_list(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("prompts must be a string or a non-empty list of strings")
    return prompts


class HFTokenizer:
    """umT5's tokenizer from the checkpoint directory (`google/umt5-xxl/tokenizer.json`).

    Same result as the official HuggingfaceTokenizer(seq_len=text_len, clean='whitespace') called
    with add_special_tokens=True: cleaned text, the tokenizer.json post-processor's special tokens
    (EOS for umT5), truncation to text_len keeping those special tokens, right padding with the pad
    token to exactly text_len. Uses the `tokenizers` package directly (what transformers' fast
    tokenizer wraps) instead of transformers.
    """

    def __init__(self, directory: str | Path, text_len: int = 512):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"no tokenizer.json in {directory}: point the T5 tokenizer at the checkpoint's "
                "google/umt5-xxl/ folder. If it only holds spiece.model, write a tokenizer.json once "
                "with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
        if text_len < 2:
            raise ValidationError(f"text_len must be at least 2 (got {text_len})")
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable tokenizers file: {e}") from e
        pad_token = _special_token(directory, "pad_token") or "<pad>"
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise CheckpointError(f"pad token {pad_token!r} is not in the vocabulary of {path}")
        tok.enable_truncation(max_length=text_len)
        tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=text_len)
        self.tokenizer = tok
        self.text_len = text_len
        self.pad_id = pad_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [whitespace_clean(p) for p in _as_list(prompts)]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


def _special_token(directory: Path, name: str) -> str | None:
    """A special token's text from tokenizer_config.json or special_tokens_map.json, if given."""
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        p = directory / filename
        if not p.is_file():
            continue
        try:
            value = json.loads(p.read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p} is not valid JSON: {e}") from e
        if isinstance(value, dict):             # AddedToken serialised as {"content": ...}
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


class ByteTokenizer:
    """The embedded default's tokenizer: UTF-8 bytes, NOT umT5's vocabulary.

    A stand-in for the tiny random-weight model (preset `tiny`), which has no trained vocabulary:
    byte b -> id b + 2 (0 = pad, 1 = EOS, as in umT5), EOS appended, truncated to keep EOS within
    text_len, right-padded with 0. Whitespace runs collapse to one space (no ftfy, so this path
    needs no extra package). Never use it with real umT5 weights.
    """

    OFFSET = 2

    def __init__(self, text_len: int = 512, vocab_size: int = 384, pad_id: int = 0, eos_id: int = 1):
        if vocab_size < 256 + self.OFFSET:
            raise ValidationError(f"ByteTokenizer needs vocab_size >= {256 + self.OFFSET} (got {vocab_size})")
        if (pad_id, eos_id) != (0, 1):
            raise ValidationError(f"ByteTokenizer reserves pad=0 and eos=1 (got {pad_id}, {eos_id})")
        if text_len < 2:
            raise ValidationError(f"text_len must be at least 2 (got {text_len})")
        self.text_len = text_len
        self.vocab_size = vocab_size

    @classmethod
    def for_config(cls, config: T5Config) -> "ByteTokenizer":
        return cls(config.text_len, config.vocab_size, config.pad_id, config.eos_id)

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = _as_list(prompts)
        ids = torch.zeros(len(prompts), self.text_len, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(prompts):
            data = " ".join(text.split()).encode("utf-8")[: self.text_len - 1]
            row = [b + self.OFFSET for b in data] + [1]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, :len(row)] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor) -> str:
        """One row of ids back to text (stops at EOS; a byte sequence cut by truncation drops
        its incomplete last character)."""
        out = bytearray()
        for t in ids.tolist():
            if t == 1:
                break
            if t >= self.OFFSET:
                out.append(t - self.OFFSET)
        return out.decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------
# transformers / -Diffusers layout


def hf_umt5_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers UMT5EncoderModel keys -> official T5Encoder keys (tensors unchanged).

    The gated FFN's GELU branch is wi_0 (official gate.0), its linear branch wi_1 (official fc1).
    `shared.weight` and `encoder.embed_tokens.weight` are the same tied table; either is used.
    Raises CheckpointError on a key it does not know.
    """
    per_layer = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif key.startswith("encoder.block."):
            index, rest = key[len("encoder.block."):].split(".", 1)
            if rest not in per_layer:
                raise CheckpointError(f"unknown UMT5 encoder key {key!r}")
            out[f"blocks.{index}.{per_layer[rest]}"] = value
        else:
            raise CheckpointError(f"unknown UMT5 encoder key {key!r}")
    return out
