"""Animate and replace generation: segments, conditioning, sampling, decoding.

Mirrors the official `WanAnimate.generate` (reference NOTES §5-§9, e2e README) step for step:

  inputs (pose, face crops, reference [, background, mask]) ─► ping-pong padded to target_len
  for each segment of clip_len frames (stride clip_len - refert_num):
      pose latents = VAE(pose frames);  y = [mask ; VAE(conditioning video)] with the reference
      latent as frame 0;  motion tokens from the face crops;  fresh noise from one CPU generator
      ─► N solver steps of the DiT (a second pass with the negative prompt and a black face when
         guide_scale > 1) ─► VAE decode, streamed; the last refert_num decoded frames condition
         the next segment (the only link between segments)
  frames go to a sink segment by segment; the output is truncated to the input length.

Work that does not change within a request is done once per request, not per segment or step:
the text context and its cross-attention K/V inputs, the CLIP features, the reference latent,
(animate) the grey first-segment conditioning latents, and the black-face motion tokens.

Precision follows the DiT's compute dtype: in bf16 the pixel batches, y, CLIP features and the
text context are rounded to bf16 exactly where the official pipeline casts them, the VAE runs in
its own dtype (fp32 officially), latents and the solver stay fp32, and UniPC's history term is
rounded to bf16 as the official autocast does. With fp32 weights everything is fp32 and the
pipeline reproduces the official e2e fixtures.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import EXACT_BACKENDS, attention_schedule, get_backend, set_attention_backend
from .clip import CLIPVisual, clip_input, letterbox
from .errors import ResourceExhausted, ValidationError
from .model import WanAnimateDiT
from .offload import Placement, oom_message, release_memory
from .sampler import SOLVERS, make_schedule, make_solver
from .vae import WanVAE

DEFAULT_PROMPT = "视频中的人在做动作"  # "the person in the video is doing actions" (wan_animate_14B config)
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走")
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000


# ----------------------------------------------------------------------------------------------
# Request options


@dataclass(frozen=True)
class GenerateOptions:
    mode: str = "animate"                     # "animate" | "replace"
    steps: int | tuple[float, ...] = 20       # a count, or explicit timesteps (few-step schedules)
    solver: str = "unipc"                     # the official CLI default
    shift: float | None = None                # None: 5.0 for a step count, unused for explicit lists
    seed: int = -1                            # -1: a fresh random seed, reported in the result
    clip_len: int = 77                        # frames per segment, 4n+1
    refert_num: int = 1                       # frames carried between segments: 1 or 5
    guide_scale: float = 1.0                  # > 1: the official negative-prompt + black-face pass
    prompt: str = ""                          # "" -> the official default prompt
    negative_prompt: str = ""                 # "" -> the official default negative prompt
    batch_cfg: bool = True                    # run the two guidance passes as one batch of 2
    attention: str = "sdpa"                   # self-attention backend (engine/attention.py)
    exact_steps: tuple[int, int] = (1, 1)     # first/last steps kept on exact (bf16) attention when
                                              # `attention` is a quantized backend (hybrid schedule)

    def validate(self) -> "GenerateOptions":
        if self.mode not in ("animate", "replace"):
            raise ValidationError(f"mode must be 'animate' or 'replace', got {self.mode!r}")
        if self.solver not in SOLVERS:
            raise ValidationError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if isinstance(self.steps, int):
            if isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
                raise ValidationError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        schedule = make_schedule(self.solver, self.steps, self.shift)   # validates lists and shift
        attention_schedule(schedule.steps, self.attention, *self.exact_steps)  # validates backend names
        if (isinstance(self.clip_len, bool) or not isinstance(self.clip_len, int)
                or self.clip_len < 5 or (self.clip_len - 1) % 4):
            raise ValidationError(f"clip_len must be 4n+1 with n >= 1 (5, 9, ..., 77), got {self.clip_len!r}")
        if self.refert_num not in (1, 5) or isinstance(self.refert_num, bool):
            raise ValidationError(f"refert_num must be 1 or 5, got {self.refert_num!r}")
        if not isinstance(self.guide_scale, (int, float)) or not math.isfinite(self.guide_scale) or self.guide_scale < 1:
            raise ValidationError(f"guide_scale must be a finite number >= 1 (1 disables guidance), got {self.guide_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed <= MAX_SEED:
            raise ValidationError(f"seed must be -1 (random) or an integer in [0, 2^63-1], got {self.seed!r}")
        return self

    def resolved(self) -> "GenerateOptions":
        """The options with seed -1 replaced by a concrete seed (reported back to the caller)."""
        self.validate()
        return self if self.seed >= 0 else replace(self, seed=secrets.randbelow(MAX_SEED))


# ----------------------------------------------------------------------------------------------
# Frame sources and the segment plan


class FrameSource(Protocol):
    """A video as the pipeline reads it: uint8 RGB frames by index, in (mostly) increasing order."""

    def __len__(self) -> int: ...
    @property
    def size(self) -> tuple[int, int]: ...                    # (height, width)
    def get(self, indices: Sequence[int]) -> np.ndarray: ...  # [n, H, W, 3] uint8


class ArraySource:
    def __init__(self, frames: np.ndarray):
        frames = np.asarray(frames)
        if frames.ndim == 3:                                    # [N, H, W] single-channel masks
            frames = frames[..., None]
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValidationError(f"expected frames [N, H, W, C] with N >= 1, got shape {frames.shape}")
        self.frames = frames

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.frames.shape[1], self.frames.shape[2]

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self.frames[list(indices)]


def pingpong(n_frames: int, target_len: int) -> list[int]:
    """The official inputs_padding: 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... up to target_len."""
    if n_frames == 1:
        return [0] * target_len            # the official code loops forever here; hold the frame
    period = 2 * (n_frames - 1)
    return [i % period if i % period < n_frames else period - i % period for i in range(target_len)]


@dataclass(frozen=True)
class Segment:
    index: int
    start: int                     # padded-frame range [start, start + clip_len)
    source_indices: list[int]      # source frame of each padded frame
    mask_reft_len: int             # frames carried in from the previous segment (0 for the first)


@dataclass(frozen=True)
class SegmentPlan:
    n_frames: int
    target_len: int
    segments: list[Segment]


def plan_segments(n_frames: int, clip_len: int, refert_num: int) -> SegmentPlan:
    if n_frames < 1:
        raise ValidationError("the driving video has no frames")
    stride = clip_len - refert_num
    rest = (n_frames - refert_num) % stride
    target_len = n_frames + (stride - rest if rest else 0)
    if target_len < clip_len:                 # shorter than one segment: pad up to one segment
        target_len = clip_len
    order = pingpong(n_frames, target_len)
    segments, start = [], 0
    while start + refert_num < target_len:
        segments.append(Segment(len(segments), start, order[start:start + clip_len], 0 if start == 0 else refert_num))
        start += stride
    return SegmentPlan(n_frames, target_len, segments)


# ----------------------------------------------------------------------------------------------
# Results and hooks


@dataclass
class GenerationResult:
    seed: int
    n_frames: int
    size: tuple[int, int]
    segments: int
    timings: dict[str, float] = field(default_factory=dict)
    frames: torch.Tensor | None = None      # [3, N, H, W] in [-1, 1] when no sink was given


Sink = Callable[[torch.Tensor], None]            # receives [3, n, H, W] float frames in [-1, 1]
Trace = Callable[[str, torch.Tensor], None]      # receives named intermediates (verification)
Progress = Callable[[str, int, int], None]       # (stage, done, total)


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """[3, n, H, W] in [-1, 1] -> [n, H, W, 3] uint8 exactly as the official save_video maps it:
    clamp, (x + 1) / 2 (make_grid's value_range normalisation), * 255, truncation to uint8."""
    x = ((frames.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class TextContext:
    context: torch.Tensor               # [L, text_dim] real tokens only (the DiT pads to text_len)
    context_null: torch.Tensor


class Pipeline:
    """Holds loaded models; `generate` runs one request. Models stay loaded between requests."""

    def __init__(self, dit: WanAnimateDiT, vae: WanVAE, clip: CLIPVisual, *, text_encoder=None, tokenizer=None,
                 device: torch.device | str = "cpu", placement: Placement | None = None):
        self.dit, self.vae, self.clip = dit, vae, clip
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device = torch.device(device)
        # Where T5/CLIP/VAE are while they run (engine/offload.py); the default keeps them resident.
        self.placement = placement or Placement()
        self._grey_latents: dict[tuple, torch.Tensor] = {}     # animate segment-0 conditioning, per shape
        self._black_motion: dict[tuple, torch.Tensor] = {}     # uncond face tokens, per clip length

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    # -- request-level, step-independent work ------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompt: str, negative_prompt: str) -> TextContext:
        from .text import encode_text
        if self.text_encoder is None or self.tokenizer is None:
            raise ValidationError("this pipeline has no text encoder: pass precomputed context embeddings")
        with self.placement.use(self.text_encoder):
            out = encode_text(self.text_encoder, self.tokenizer, [prompt or DEFAULT_PROMPT,
                                                                  negative_prompt or DEFAULT_NEGATIVE_PROMPT])
        return TextContext(out.trimmed[0].to(self.device), out.trimmed[1].to(self.device))

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [n, H, W, 3] -> [1, 3, n, H, W] in [-1, 1]: x/127.5 - 1 in float64 as officially,
        then rounded to the compute dtype."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, torch.float64) / 127.5 - 1
        return x.permute(3, 0, 1, 2).unsqueeze(0).to(self.dtype)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.placement.use(self.vae):
            return self.vae.encode(pixels.to(self.vae.dtype), tiling=self.placement.vae_tiling)

    def _decode(self, latents: torch.Tensor):
        with self.placement.use(self.vae):
            yield from self.vae.decode_stream(latents, tiling=self.placement.vae_tiling)

    @torch.no_grad()
    def reference_features(self, reference: np.ndarray, size: tuple[int, int]):
        """Letterboxed reference -> (latent [1, 16, 1, h, w], CLIP features [1, 257, D] in dtype)."""
        boxed = letterbox(reference, *size)
        pixels = self._pixels(boxed[None])                               # [1, 3, 1, H, W]
        latent = self._encode(pixels)
        clip_in = clip_input(pixels[:, :, 0].float(), self.clip.config)   # fp32 resize on rounded pixels
        with self.placement.use(self.clip):
            clip_fea = self.clip(clip_in.to(next(self.clip.parameters()).dtype)).to(self.dtype)
        return boxed, latent, clip_fea

    def _grey(self, t: int, h: int, w: int) -> torch.Tensor:
        key = (t, h, w, self.dtype, self.vae.dtype)
        if key not in self._grey_latents:
            self._grey_latents[key] = self._encode(torch.zeros(1, 3, t, h, w, device=self.device, dtype=self.dtype))
        return self._grey_latents[key]

    def _black_face_motion(self, t: int, size: int) -> torch.Tensor:
        key = (t, size, self.dtype)
        if key not in self._black_motion:
            face = torch.full((1, 3, t, size, size), -1.0, device=self.device, dtype=self.dtype)
            self._black_motion[key] = self.dit.encode_motion(face)
        return self._black_motion[key]

    # -- validation before any heavy work -----------------------------------------------------

    def check_inputs(self, pose: FrameSource, face: FrameSource, options: GenerateOptions,
                     background: FrameSource | None = None, mask: FrameSource | None = None) -> tuple[int, int]:
        h, w = pose.size
        if h % 16 or w % 16:
            raise ValidationError(f"the pose video is {w}x{h}; width and height must be multiples of 16 "
                                  "(preprocess with a resolution that gives multiples of 16)")
        if len(face) != len(pose):
            raise ValidationError(f"pose video has {len(pose)} frames but face video has {len(face)}; they must "
                                  "come from the same preprocessing run")
        fh, fw = face.size
        if fh != fw:
            raise ValidationError(f"face crops must be square (512x512 officially), got {fw}x{fh}")
        if options.mode == "replace":
            if background is None or mask is None:
                raise ValidationError("replace mode needs the background (src_bg.mp4) and mask (src_mask.mp4) videos")
            for name, src in (("background", background), ("mask", mask)):
                if src.size != (h, w):
                    raise ValidationError(f"{name} video is {src.size[1]}x{src.size[0]}, pose video is {w}x{h}: they must match")
                if len(src) != len(pose):
                    raise ValidationError(f"{name} video has {len(src)} frames, pose video has {len(pose)}")
        return h, w

    # -- generation ---------------------------------------------------------------------------

    def generate(self, reference: np.ndarray, pose: FrameSource, face: FrameSource, options: GenerateOptions, *,
                 background: FrameSource | None = None, mask: FrameSource | None = None,
                 text: TextContext | None = None, sink: Sink | None = None, trace: Trace | None = None,
                 progress: Progress | None = None, generator: torch.Generator | None = None) -> GenerationResult:
        """Run one request. Running out of device memory anywhere in it raises ResourceExhausted
        naming the stage and what to change; the pipeline's memory is then back where it was
        before the request and it serves the next one."""
        options = options.resolved()
        height, width = self.check_inputs(pose, face, options, background, mask)
        where = {"stage": "start"}
        failure = None
        try:
            return self._generate(reference, pose, face, options, (height, width), where, background=background,
                                  mask=mask, text=text, sink=sink, trace=trace, progress=progress, generator=generator)
        except torch.cuda.OutOfMemoryError as e:
            # Keep only a string: the exception's traceback holds every frame of the request and so
            # every tensor in it. Recovery happens after this block, once those are gone
            # (pytorch/pytorch#18853).
            failure = str(e).split("\n")[0]
        release_memory(self.device, self.placement)
        raise ResourceExhausted(oom_message(failure, where["stage"], (height, width), options, self.placement))

    @torch.no_grad()
    def _generate(self, reference: np.ndarray, pose: FrameSource, face: FrameSource, options: GenerateOptions,
                  size: tuple[int, int], where: dict, *, background: FrameSource | None, mask: FrameSource | None,
                  text: TextContext | None, sink: Sink | None, trace: Trace | None, progress: Progress | None,
                  generator: torch.Generator | None) -> GenerationResult:
        height, width = size
        plan = plan_segments(len(pose), options.clip_len, options.refert_num)
        if len(plan.segments) >= 3 and options.clip_len - options.refert_num < options.refert_num:
            # The official code carries frames out of the previous segment's trimmed output, which
            # has only clip_len - refert_num frames: from the third segment on it has too few.
            raise ValidationError(f"clip_len {options.clip_len} is too short to carry {options.refert_num} frames "
                                  f"through {len(plan.segments)} segments: use clip_len >= {2 * options.refert_num + 3}")
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        note = trace or (lambda name, value: None)
        generator = generator or torch.Generator("cpu").manual_seed(options.seed)
        guided = options.guide_scale > 1

        where["stage"] = "text encoder (T5)"
        text = text or self.encode_prompts(options.prompt, options.negative_prompt)
        where["stage"] = "reference image (VAE encode, CLIP)"
        boxed, ref_latent, clip_fea = self.reference_features(reference, (height, width))
        note("ref.letterboxed", torch.from_numpy(boxed))
        note("clip.fea", clip_fea[0].float())
        note("ref.latent", ref_latent[0])
        contexts = [text.context] + ([text.context_null] if guided else [])
        context_tokens = self.dit.embed_context([c.to(self.dtype) for c in contexts],
                                                clip_fea.expand(len(contexts), -1, -1))
        timings["prepare_s"] = time.perf_counter() - tick

        t, h, w = options.clip_len, height // 8, width // 8
        lat_t = t // 4 + 1
        y_ref = torch.cat([torch.ones(1, 4, 1, h, w, device=self.device), ref_latent], dim=1)
        schedule = make_schedule(options.solver, options.steps, options.shift)
        # Exact attention on the first/last steps when a quantized backend runs the rest.
        exact = options.attention.split(":")[0] in EXACT_BACKENDS
        backends = attention_schedule(schedule.steps, options.attention, *((0, 0) if exact else options.exact_steps))
        get_backend(options.attention)                     # a missing package fails before any step
        previous = {m: m.backend for m in self.dit.modules() if type(m).__name__ == "SelfAttention"}
        out_frames: list[torch.Tensor] = []
        emitted, carried = 0, None
        for seg in plan.segments:
            k = seg.index
            seg_tick = time.perf_counter()
            where["stage"] = f"segment {k + 1}/{len(plan.segments)}: VAE encode of the conditions"
            noise = torch.randn(16, lat_t + 1, h, w, generator=generator, dtype=torch.float32)
            note(f"seg{k}.noise", noise)
            pose_px = self._pixels(pose.get(seg.source_indices))
            face_px = self._pixels(face.get(seg.source_indices))
            pose_latents = self._encode(pose_px)
            note(f"seg{k}.pose_latents", pose_latents[0])

            # Conditioning video and pixel-rate mask (NOTES §5): grey or background frames, with the
            # carried frames of the previous segment in front, and 1 where the frame is known.
            r = seg.mask_reft_len
            if options.mode == "animate":
                msk = torch.zeros(1, t, h, w, device=self.device)
                if r == 0:
                    cond_latents = self._grey(t, height, width)
                else:
                    video = torch.cat([carried.to(self.dtype),
                                       torch.zeros(1, 3, t - r, height, width, device=self.device, dtype=self.dtype)], 2)
                    cond_latents = self._encode(video)
            else:
                bg_px = self._pixels(background.get(seg.source_indices))
                video = bg_px if r == 0 else torch.cat([carried.to(self.dtype), bg_px[:, :, r:]], dim=2)
                cond_latents = self._encode(video)
                m = torch.from_numpy(mask.get(seg.source_indices)[..., 0].astype(np.float64) / 255.0)
                m = 1 - m.to(self.device, self.dtype)                                  # [T, H, W]
                msk = F.interpolate(m[:, None].float(), size=(h, w), mode="nearest")[:, 0][None].to(m.dtype)
            msk = msk.float()
            msk[:, :r] = 1
            # 4 mask channels = the 4 pixel frames folded into each latent frame (frame 0 repeated).
            msk = torch.cat([msk[:, :1].repeat(1, 4, 1, 1), msk[:, 1:]], dim=1).view(1, lat_t, 4, h, w).transpose(1, 2)
            note(f"seg{k}.cond_latents", cond_latents[0])
            y = torch.cat([y_ref, torch.cat([msk, cond_latents], dim=1)], dim=2).to(self.dtype)
            note(f"seg{k}.y", y[0])

            where["stage"] = f"segment {k + 1}/{len(plan.segments)}: motion encoder and DiT prepare"
            vectors = self.dit.motion_vectors(face_px)
            note(f"seg{k}.motion", vectors[0])
            motion = self.dit.motion_tokens(vectors)
            if guided:
                motion = torch.cat([motion, self._black_face_motion(t, face.size[0])])
            if guided and options.batch_cfg:
                cond = self.dit.prepare(y.expand(2, -1, -1, -1, -1), pose_latents.expand(2, -1, -1, -1, -1).to(self.dtype),
                                        motion=motion, context_tokens=context_tokens)
            else:
                cond = self.dit.prepare(y, pose_latents.to(self.dtype), motion=motion[:1], context_tokens=context_tokens[:1])
                cond_null = (self.dit.prepare(y, pose_latents.to(self.dtype), motion=motion[1:],
                                              context_tokens=context_tokens[1:]) if guided else None)

            solver = make_solver(schedule, bf16_history=self.dtype == torch.bfloat16)
            latents = noise.to(self.device)[None]
            for i, step_t in enumerate(schedule.timesteps.tolist()):
                if i == 0 or backends[i] != backends[i - 1]:
                    set_attention_backend(self.dit, backends[i], which=("self",))
                where["stage"] = f"segment {k + 1}/{len(plan.segments)}: DiT step {i + 1}/{schedule.steps}"
                note(f"seg{k}.x_in", latents[0])
                if guided and options.batch_cfg:
                    pred_c, pred_u = self.dit.denoise(latents.expand(2, -1, -1, -1, -1), torch.tensor([step_t] * 2, device=self.device), cond).chunk(2)
                elif guided:
                    tt = torch.tensor([step_t], device=self.device)
                    pred_c, pred_u = self.dit.denoise(latents, tt, cond), self.dit.denoise(latents, tt, cond_null)
                else:
                    pred_c = self.dit.denoise(latents, torch.tensor([step_t], device=self.device), cond)
                note(f"seg{k}.pred_cond", pred_c[0])
                pred = pred_c
                if guided:
                    note(f"seg{k}.pred_uncond", pred_u[0])
                    pred = pred_u + options.guide_scale * (pred_c - pred_u)
                latents = solver.step(pred, latents)
                note(f"seg{k}.latents_after_step", latents[0])
                if progress:
                    progress(f"segment {k + 1}/{len(plan.segments)}", i + 1, schedule.steps)
            cond = cond_null = None       # the cross-attention K/V and pose tokens (~1 GB at 480p) are done

            # Decode, streamed: drop the frames that duplicate the previous segment's tail, keep
            # the last refert_num decoded frames to condition the next segment.
            decoded_at, tail, dropped = 0, [], []
            where["stage"] = f"segment {k + 1}/{len(plan.segments)}: VAE decode"
            for chunk in self._decode(latents[:, :, 1:].float()):
                tail.append(chunk)
                keep = chunk[:, :, max(0, r - decoded_at):]
                if decoded_at < r:
                    dropped.append(chunk[:, :, : r - decoded_at])
                decoded_at += chunk.shape[2]
                keep = keep[:, :, : max(0, plan.n_frames - emitted)]
                if keep.shape[2]:
                    emitted += keep.shape[2]
                    (sink or out_frames.append)(keep[0] if sink else keep[0].cpu())
                tail = _last_frames(tail, options.refert_num)
            if dropped:
                note(f"seg{k}.decoded_dropped", torch.cat(dropped, dim=2)[0])
            carried = torch.cat(tail, dim=2)[:, :, -options.refert_num:]
            if k + 1 < len(plan.segments):
                note(f"seg{k + 1}.refert_frames", carried[0])
            timings[f"segment{k}_s"] = time.perf_counter() - seg_tick

        for module, backend in previous.items():        # leave the model as it was given
            module.backend = backend
        timings["total_s"] = time.perf_counter() - tick
        frames = torch.cat(out_frames, dim=1) if not sink else None
        return GenerationResult(options.seed, plan.n_frames, (height, width), len(plan.segments), timings, frames)


def _last_frames(chunks: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Keep only the chunks needed to hold the last n frames."""
    kept, total = [], 0
    for c in reversed(chunks):
        kept.append(c)
        total += c.shape[2]
        if total >= n:
            break
    return kept[::-1]
