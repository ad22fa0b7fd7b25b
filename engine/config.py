"""Model configurations: frozen dataclasses and named presets.

`14b` holds the official Wan2.2-Animate-14B hyperparameters (wan/configs/wan_animate_14B.py and
the WanAnimateModel constructor; reference NOTES §2). `tiny` is the embedded default: the same
architecture shrunk so that a CPU forward takes about a second; its weights come from the recipe
(engine/recipe.py), never from a checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ValidationError


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36                  # 16 noise + 4 mask + 16 conditioning-latent channels
    out_dim: int = 16
    pose_dim: int = 16                # pose latents (VAE z_dim); hard-coded in the official model
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512               # T5 context is zero-padded to this many rows
    text_dim: int = 4096              # umT5-XXL width
    freq_dim: int = 256               # sinusoidal timestep embedding
    eps: float = 1e-6
    image_dim: int = 1280             # CLIP ViT-H/14 width (hard-coded in the official MLPProj)
    image_tokens: int = 257           # cls + 16x16 patches; the cross-attention splits context here
    motion_size: int = 512            # face-crop resolution the LIA motion encoder takes
    motion_width: int = 512           # widest LIA conv; channels at resolution r = min(width, 16384 // r)
    motion_encoder_dim: int = 512     # LIA style dim = face-encoder input
    motion_dim: int = 20              # LIA motion directions
    motion_batch: int = 8             # face frames per motion-encoder call (official encode_bs)
    face_hidden: int = 1024           # face-encoder conv width per head (hard-coded in FaceEncoder)
    face_heads: int = 4               # face-encoder heads = motion tokens per latent frame (+1 pad)
    face_adapter_every: int = 5       # a face block after blocks 0, 5, 10, ...
    rope_theta: float = 10000.0
    rope_max_len: int = 1024          # positions per axis

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValidationError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.num_layers < self.face_adapter_every or self.num_layers % self.face_adapter_every:
            raise ValidationError(
                f"num_layers {self.num_layers} must be a positive multiple of {self.face_adapter_every}:"
                " block 0 is always followed by face block 0")
        if self.motion_size & (self.motion_size - 1) or self.motion_size < 8:
            raise ValidationError(f"motion_size {self.motion_size} must be a power of two >= 8")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim split over (t, h, w): 44/42/42 at head_dim 128 (d - 4(d//6), 2(d//6), 2(d//6))."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def num_face_blocks(self) -> int:
        return self.num_layers // self.face_adapter_every

    def motion_channels(self, resolution: int) -> int:
        return min(self.motion_width, 16384 // resolution)

    @classmethod
    def from_official(cls, args: Mapping[str, Any]) -> "DiTConfig":
        """From WanAnimateModel constructor arguments (a fixture's `constructor_args` or the
        checkpoint's config.json). Arguments the engine does not model must keep their only
        supported value."""
        fixed = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
                 "use_img_emb": True, "use_context_parallel": False}
        for k, v in fixed.items():
            if k in args and (list(args[k]) if isinstance(args[k], (list, tuple)) else args[k]) != v:
                raise ValidationError(f"WanAnimateModel argument {k}={args[k]!r} is not supported (only {v!r})")
        names = {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len",
                 "text_dim", "freq_dim", "eps", "motion_encoder_dim"}
        kwargs = {k: args[k] for k in names if k in args}
        if "patch_size" in args:
            kwargs["patch_size"] = tuple(args["patch_size"])
        ignored = set(args) - names - set(fixed) - {"patch_size", "_class_name", "_diffusers_version",
                                                     "model_type"}
        if ignored:
            raise ValidationError(f"unknown WanAnimateModel arguments: {sorted(ignored)}")
        return cls(**kwargs)


# Wan2.1 VAE latent statistics, hard-coded in the official Wan2_1_VAE.__init__.
VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    mean: tuple[float, ...] = VAE_MEAN
    std: tuple[float, ...] = VAE_STD
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 1


@dataclass(frozen=True)
class CLIPConfig:
    """The ViT-H/14 visual tower of the XLM-R open-clip checkpoint, as Animate uses it."""
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    num_layers: int = 32              # Animate uses the output of block num_layers-1 (no post-norm)
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything one pipeline needs: the four networks' shapes."""
    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    clip: CLIPConfig
    # The embedded default's weights are recipe-built from this seed; None for a real checkpoint.
    recipe_seed: int | None = None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    "14b": ModelConfig(name="14b", dit=DiTConfig(), vae=VAEConfig(), t5=T5Config(), clip=CLIPConfig()),
    "tiny": ModelConfig(
        name="tiny",
        dit=DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=5, text_dim=64, image_dim=64,
                      motion_size=64, motion_width=32, motion_encoder_dim=64, face_hidden=64),
        vae=VAEConfig(dim=8),
        t5=T5Config(vocab_size=384, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
        clip=CLIPConfig(dim=64, mlp_ratio=2.0, num_heads=4, num_layers=3),
        recipe_seed=1234,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValidationError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
