"""wanimate's generation pipeline against diffusers' `WanAnimatePipeline` (diffusers 0.42.1).

One set of tiny recipe weights (DiT, VAE, umT5, CLIP built from engine/recipe.py) runs in
wanimate's `Pipeline` and, converted with `official_to_diffusers` / `official_vae_to_diffusers`,
in a `WanAnimatePipeline` built directly from components. fp32, CPU, 2 UniPC steps, 2-3 segments.

Both encoders are bypassed on the diffusers side, because diffusers uses other models and other
preprocessing for them (differences 5-7): the text goes in as `prompt_embeds` /
`negative_prompt_embeds` (our umT5 output, zero-padded to 512 rows), and the CLIP features come
from small adapter components (`_OfficialCLIPProcessor`, `_OurCLIPTower`) that run the official
preprocessing and our CLIP tower, since diffusers cannot take `image_embeds` together with the
image (difference 6). Stages are compared on the transformer's inputs and outputs, captured by
a forward hook, and on the latents after each step (`callback_on_step_end`).

Agreement (measured here, fp32, several seeds; rel = relative L2, max = max abs):
- Segment plan: the same target length, segment count, starts and ping-pong padding
  (`pad_video_frames` == `pingpong`), the same frames per segment, the first `refert_num` frames
  of later segments dropped, output truncated to the input length.
- Noise: bitwise equal per segment when diffusers gets a CPU `torch.Generator` with the same
  seed (both draw one [1, 16, F+1, h, w] fp32 tensor per segment and nothing else).
- Conditioning: the 4 mask channels of y (i2v packing; replace mode 1 - mask, nearest
  downsample, first refert_num frames forced to 1) bitwise equal. On segment 0 (difference 3
  only; the VAE itself is bit-identical): y latents rel 2e-7..5e-7, pose latents rel 3e-7..5e-7.
- Timesteps: both give the transformer int64 timesteps, sigma * 1000 truncated (999, 833 at 2 steps).
- Classifier-free guidance: both run the negative prompt with a black face (face * 0 - 1) and
  combine uncond + g (cond - uncond). wanimate batches the two passes; this makes no difference in fp32.
- UniPC update: bitwise equal on the same sigmas (1..50 steps, random model outputs).
- DiT prediction on identical inputs: rel 3e-6..5e-6 at t = 999 and 833, rel 3e-7 at t = 0
  (difference 2). Along the run: predictions rel 3e-6..5e-6, latents after each step rel 1e-6..3e-6.
- Carried frames (the last refert_num decoded frames, re-encoded for the next segment): max
  3e-6..6e-6 on [0, 1]. Later segments' y rel 2e-6..5e-6. Final video: rel 1.5e-6..1.8e-6,
  max 5e-6..1e-5 on [0, 1]. This holds for animate and replace, refert_num 1 and 5, guidance 1
  and 2, and either shared schedule (difference 1).

Known differences (each pinned by a test below, so a change on either side shows up):
1. Default schedule (NOTES §15.5 item 3). diffusers' flow UniPC spaces s over [1, 1/1000]. The
   official spaces it over [0.999, 0]. Both then apply shift 5. At 20 steps, diffusers gives
   999 989 978 965 952 937 921 902 882 859 833 803 769 729 682 625 556 470 359 211 and the
   official gives 999 989 978 965 952 937 920 902 882 859 833 803 768 728 681 624 555 468 356 208.
   First sigma 0.999999 vs 0.999800, last sigma 0.211622 vs 0.208160. The pipeline always calls
   `set_timesteps(num_inference_steps)`. Two ways give equality. (a) wanimate takes diffusers'
   schedule as an explicit list: `steps=tuple(1000 * sigma)` reproduces diffusers' sigmas and
   timesteps bitwise. (b) A scheduler whose `set_timesteps` passes the unshifted official grid
   as `sigmas=` reproduces `make_schedule("unipc", n)` bitwise. Both routes are tested end to end.
2. Time embedding precision. The brief assumed diffusers passes float timesteps; measured, it
   does not: `UniPCMultistepScheduler` stores int64 timesteps and the pipeline passes them
   unchanged, as the official does. But diffusers computes the sinusoidal embedding in float32,
   while the official (and wanimate) use float64. Embedding max abs diff 3.1e-5 at t = 999 and
   833, exact at t = 0. This is the main source of the DiT prediction gap: rel 3e-6..5e-6 vs
   3e-7 at t = 0.
3. Pixel scaling: diffusers computes float32 x / 255 * 2 - 1, the official float64 x / 127.5 - 1
   rounded to float32. 128 of the 256 codes differ, by at most 6e-8. Effect: pose and reference
   latents rel 2e-7..5e-7. Mask scaling (x / 255, 1 - m) is equal for all 256 codes.
4. Reference letterbox (`WanAnimateImageProcessor`, resize_mode="fill"). diffusers uses PIL
   bilinear (antialiased) at offset W//2 - w//2; the official uses cv2 INTER_LINEAR at offset
   int((W - w) / 2). The placement shifts by 1 px when the fitted side is odd: rel 0.28..0.34 for
   a 30x45 reference in 48x32. 384x512 into 1280x720 lands in the same place, but the resampling
   differs: rel 0.016, max 45/255. Identical when the reference is already H x W (as in the
   pipeline tests here).
5. CLIP input (NOTES §15.5 item 2). diffusers runs `CLIPImageProcessor` on the raw image: shortest
   side to 224 with PIL bicubic, then a 224 center crop. The official stretches the letterboxed
   H x W reference to 224x224 with torch bicubic (no antialias, no crop). Rel L2 of the 224x224
   input, with the transformers defaults (= the laion ViT-H config): 1.25 for a 384x512 portrait
   into a 1280x720 video, 1.07 into 720x1280, and 0.079 for a square 512 image into 512x512,
   where only the resampling differs. The checkpoints (laion ViT-H hidden_states[-2] vs the
   official XLM-R open-clip tower, block 31) are not compared here.
6. `image_embeds` is unusable: `check_inputs` rejects `image` together with `image_embeds`, but
   the image is required for the reference latent. So diffusers always runs its own CLIP
   preprocessing and encoder.
7. Text: diffusers uses transformers' `UMT5EncoderModel` and its tokenizer. Not compared here
   (bypassed with `prompt_embeds`). `WanAttnProcessor` hard-codes 512 text rows, so embeddings
   must be padded to exactly 512.
8. Replace-mode mask. diffusers converts the mask frames to PIL "L" luma
   (0.299 R + 0.587 G + 0.114 B); the official takes the red channel. Identical for grey masks
   (R = G = B). On random colour frames, max diff 0.66, rel 0.46.
9. Input resizing. diffusers stretches a pose video that is not height x width and resizes face
   crops to `motion_encoder_size` with PIL lanczos. The official resizes neither. wanimate takes
   the size from the pose video and area-resizes face crops only when they are not
   `motion_size`, which only happens with the tiny preset; official crops are already 512.
   Effect on the tiny model, 32 px crops to 16: motion tokens rel 0.002..0.005 for smooth crops,
   0.01..0.04 for noise crops.
10. Short inputs: n_frames <= refert_num. diffusers plans zero segments and fails with
    `torch.cat` ValueError. With n = 1 and refert 5 it fails earlier, with an IndexError in
    `pad_video_frames`. The official also plans zero segments (and its padding loops forever at
    n = 1). wanimate generates one padded segment.
11. bf16 (NOTES §15.5 item 1): diffusers keeps the residual stream in bf16, the official (and
    wanimate) in fp32. Tiny DiT, diffusers loaded with `from_pretrained(torch_dtype=bfloat16)`,
    bf16-rounded inputs of the real steps, rel L2 vs fp32: diffusers 0.0085..0.0089, wanimate
    0.0063..0.0069 (1.3x..1.4x).
12. VAE precision: diffusers' example loads the whole pipeline in bf16 ("optionally upcast the
    VAE"); the official VAE always runs in fp32. Not measured here.
13. 8-bit output: no difference. diffusers' `export_to_video`, the official `save_video` and
    wanimate's `to_uint8_frames` all truncate (x * 255 -> uint8); pinned by a test.
14. Seeds: diffusers draws from whatever generator it is given (a CUDA generator gives another
    stream); the official uses a CUDA generator; wanimate always uses a CPU generator.
15. Options: diffusers rounds a `segment_frame_length` that is not 4n+1 down with a warning;
    wanimate raises ValidationError. For clip_len 9 with refert_num 5 wanimate, like the official
    loop, runs up to two segments (a third would need more carried frames than the trimmed output
    holds: refused up front); diffusers plans target // stride segments, one too many when
    refert_num > stride, and stops on its own `assert` after the first segment. diffusers has no
    relighting-LoRA flag (NOTES §15.5 item 5).
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
PIL_Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

from helpers import DATA  # noqa: E402
from wanimate.engine.clip import CLIPVisual, clip_input, letterbox, to_pixels  # noqa: E402
from wanimate.engine.components import recipe_module  # noqa: E402
from wanimate.engine.config import CLIPConfig, DiTConfig, T5Config, VAEConfig  # noqa: E402
from wanimate.engine.errors import ValidationError  # noqa: E402
from wanimate.engine.loader import diffusers_config, load_dit_state_dict, official_to_diffusers, recipe_dit  # noqa: E402
from wanimate.engine.model import sinusoidal_embedding  # noqa: E402
from wanimate.engine.pipeline import (ArraySource, GenerateOptions, Pipeline, pingpong, plan_segments,  # noqa: E402
                                      to_uint8_frames)
from wanimate.engine.sampler import make_schedule, make_solver  # noqa: E402
from wanimate.engine.text import ByteTokenizer, T5Encoder  # noqa: E402
from wanimate.engine.vae import WanVAE, official_vae_to_diffusers  # noqa: E402

DIT = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=5, text_dim=32, image_dim=32, motion_size=16,
                motion_width=32, motion_encoder_dim=32, face_hidden=48)          # text_len 512, as diffusers needs
VAE = VAEConfig(dim=8)
T5 = T5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=1)
CLIP = CLIPConfig(dim=32, mlp_ratio=2.0, num_heads=2, num_layers=2)
H, W = 32, 48                                  # latent 4 x 6, 2 x 3 tokens per frame
STEPS = 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Components: one set of weights, two pipelines


class _OfficialCLIPProcessor:
    """Stands in for diffusers' `image_processor`: the official CLIP preprocessing (bicubic stretch
    of the letterboxed reference). Tests pass references that are already H x W, so the
    letterbox is the identity and the raw image the pipeline hands over is the letterboxed one."""

    def __call__(self, images, return_tensors="pt"):
        pixels = to_pixels(np.asarray(images.convert("RGB")))            # [1, 3, H, W], float64 scaling
        return transformers.BatchFeature({"pixel_values": clip_input(pixels, CLIP)})


class _OurCLIPTower(nn.Module):
    """Stands in for diffusers' `image_encoder`: our CLIP tower, whose output is what diffusers
    reads as `hidden_states[-2]` (the penultimate block, no post-norm)."""

    def __init__(self, clip: CLIPVisual):
        super().__init__()
        self.clip = clip

    device = property(lambda self: next(self.clip.parameters()).device)
    dtype = property(lambda self: next(self.clip.parameters()).dtype)

    def forward(self, pixel_values, output_hidden_states=True):
        features = self.clip(pixel_values)
        return SimpleNamespace(hidden_states=(features, None))


class _OfficialScheduleUniPC(diffusers.UniPCMultistepScheduler):
    """diffusers' UniPC on the official sigma grid: s spaced over [0.999, 0) (the official
    scheduler's training-table range, largest entry float32(0.999)), shifted by diffusers itself."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        table_max = float(np.float32(1 - 1 / self.config.num_train_timesteps))
        s = np.linspace(table_max, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=s)


def _scheduler(official: bool = False):
    cls = _OfficialScheduleUniPC if official else diffusers.UniPCMultistepScheduler
    return cls(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0)


def _diffusers_vae(vae: WanVAE):
    model = diffusers.AutoencoderKLWan(
        base_dim=VAE.dim, z_dim=VAE.z_dim, dim_mult=list(VAE.dim_mult), num_res_blocks=VAE.num_res_blocks,
        attn_scales=[], temperal_downsample=list(VAE.temporal_downsample), latents_mean=list(VAE.mean),
        latents_std=list(VAE.std))
    model.load_state_dict(official_vae_to_diffusers(vae.state_dict()), strict=True)
    return model.eval()


def _diffusers_transformer(dit):
    model = diffusers.WanAnimateTransformer3DModel.from_config(diffusers_config(DIT))
    model.load_state_dict(official_to_diffusers(dit.state_dict(), DIT), strict=True)
    return model.eval()


def _meta(factory):
    with torch.device("meta"):
        return factory()


@pytest.fixture(scope="module")
def models():
    dit = recipe_dit(DIT, 301)
    vae = recipe_module(_meta(lambda: WanVAE(VAE)), 302)
    t5 = recipe_module(_meta(lambda: T5Encoder(T5)), 303)
    clip = recipe_module(_meta(lambda: CLIPVisual(CLIP)), 304)
    ours = Pipeline(dit, vae, clip, text_encoder=t5, tokenizer=ByteTokenizer.for_config(T5))
    transformer = _diffusers_transformer(dit)

    def theirs(official_schedule: bool = False):
        return diffusers.WanAnimatePipeline(
            tokenizer=None, text_encoder=None, vae=_diffusers_vae(vae), scheduler=_scheduler(official_schedule),
            image_processor=_OfficialCLIPProcessor(), image_encoder=_OurCLIPTower(clip), transformer=transformer)

    text = ours.encode_prompts("a person dances", "blurry, static")
    return SimpleNamespace(dit=dit, vae=vae, clip=clip, ours=ours, transformer=transformer, theirs=theirs, text=text,
                           cache={})


# ----------------------------------------------------------------------------------------------
# Inputs


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _smooth_frames(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: a random 4x4 colour grid per frame, upsampled bicubically (the tiny
    VAE sees image-like content, not white noise)."""
    coarse = torch.from_numpy(rng.standard_normal((n, 3, 4, 4)).astype(np.float32))
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1.5, 1.5) / 1.5
    return ((x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _inputs(seed: int, n: int, h: int = H, w: int = W, face: int = DIT.motion_size):
    rng = np.random.default_rng(seed)
    char = _smooth_frames(rng, n, h, w)[..., 0] > 128
    mask = np.where(char, 255, 0).astype(np.uint8)
    mask[:, ::5] = 90                      # compressed masks have fractional edges; keep some
    return SimpleNamespace(reference=_smooth_frames(rng, 1, h, w)[0], pose=_smooth_frames(rng, n, h, w),
                           face=_smooth_frames(rng, n, face, face), background=_smooth_frames(rng, n, h, w),
                           mask=np.repeat(mask[..., None], 3, axis=-1))   # grey RGB, as decoded from mp4


def _pil(frames: np.ndarray) -> list:
    return [PIL_Image.fromarray(np.ascontiguousarray(f)) for f in frames]


def _pad512(context: torch.Tensor) -> torch.Tensor:
    return torch.cat([context, context.new_zeros(512 - context.shape[0], context.shape[1])])[None]


def _diffusers_steps(n: int) -> tuple[float, ...]:
    """diffusers' default schedule as a wanimate explicit timestep list (sigma * 1000)."""
    scheduler = _scheduler()
    scheduler.set_timesteps(n)
    return tuple(float(s) * 1000 for s in scheduler.sigmas[:-1].double())


def _run(models, *, mode="animate", refert=1, guide=1.0, n=None, clip_len=None, steps=STEPS,
         official_schedule=False, seed=None, h=H, w=W):
    """Both pipelines on the same inputs; returns everything the stage checks need."""
    clip_len = clip_len or (5 if refert == 1 else 13)
    n = n or (11 if refert == 1 else 14)                   # 3 (refert 1) or 2 (refert 5) segments
    seed = _seed() if seed is None else seed
    x = _inputs(seed, n, h, w)
    pipe = models.theirs(official_schedule)
    calls, step_latents = [], []

    def hook(module, args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    def on_step(pipeline, i, t, tensors):
        step_latents.append(tensors["latents"].clone())
        return {}

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        extra = dict(background_video=_pil(x.background), mask_video=_pil(x.mask)) if mode == "replace" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            video = pipe(image=PIL_Image.fromarray(x.reference), pose_video=_pil(x.pose), face_video=_pil(x.face),
                         **extra, prompt_embeds=_pad512(models.text.context),
                         negative_prompt_embeds=_pad512(models.text.context_null), height=h, width=w, mode=mode,
                         segment_frame_length=clip_len, prev_segment_conditioning_frames=refert,
                         num_inference_steps=steps, guidance_scale=guide,
                         generator=torch.Generator().manual_seed(seed), output_type="pt",
                         callback_on_step_end=on_step).frames[0]                   # [T, 3, H, W] in [0, 1]
    finally:
        handle.remove()

    trace: dict[str, list[torch.Tensor]] = {}
    options = GenerateOptions(mode=mode, refert_num=refert, guide_scale=guide, clip_len=clip_len, seed=seed,
                              steps=steps if official_schedule else _diffusers_steps(steps))
    extra = dict(background=ArraySource(x.background), mask=ArraySource(x.mask)) if mode == "replace" else {}
    result = models.ours.generate(x.reference, ArraySource(x.pose), ArraySource(x.face), options,
                                  text=models.text, trace=lambda k, v: trace.setdefault(k, []).append(v.clone()),
                                  **extra)
    return SimpleNamespace(seed=seed, n=n, clip_len=clip_len, refert=refert, guide=guide, calls=calls,
                           step_latents=step_latents, video=video.permute(1, 0, 2, 3), trace=trace, result=result,
                           plan=plan_segments(n, clip_len, refert), options=options, inputs=x)


def _cached_run(models, **kw):
    key = tuple(sorted(kw.items()))
    if key not in models.cache:
        models.cache[key] = _run(models, **kw)
    return models.cache[key]


# ----------------------------------------------------------------------------------------------
# Stage by stage


CASES = [("animate", 1, 1.0), ("replace", 1, 1.0), ("animate", 5, 2.0), ("replace", 5, 2.0)]


@pytest.mark.parametrize("mode,refert,guide", CASES, ids=[f"{m}-r{r}-g{g:g}" for m, r, g in CASES])
def test_pipelines_agree_stage_by_stage(models, mode, refert, guide):
    r = _cached_run(models, mode=mode, refert=refert, guide=guide)
    msg = f"seed={r.seed}"
    passes = 2 if guide > 1 else 1
    segments = len(r.calls) // (STEPS * passes)

    # segment plan: as many segments (and transformer calls) as ours; the same output length
    assert segments == len(r.plan.segments) == r.result.segments and len(r.calls) == segments * STEPS * passes, msg
    assert r.video.shape == r.result.frames.shape == (3, r.n, H, W), msg
    schedule = make_schedule("unipc", r.options.steps)

    for k in range(segments):
        first, _ = r.calls[k * STEPS * passes]
        hidden = first["hidden_states"][0]                                           # [36, F+1, h, w]
        # fresh noise per segment from the one CPU generator: the same stream, bitwise
        assert torch.equal(hidden[:16], r.trace[f"seg{k}.noise"][0]), (k, msg)
        # y = [mask (4 packed pixel frames) ; reference + conditioning latents]
        y = r.trace[f"seg{k}.y"][0]
        assert torch.equal(hidden[16:20], y[:4]), (k, msg)
        assert rel(y[4:], hidden[20:]) < (1e-6 if k == 0 else 2e-5), (k, msg)
        assert rel(r.trace[f"seg{k}.pose_latents"][0], first["pose_hidden_states"][0]) < 1e-6, (k, msg)
        if mode == "replace":                  # the mask is live: 1 - mask, fractional values kept
            m = y[:4, 1:]
            assert ((m > 0) & (m < 1)).any(), msg
        if k > 0:                              # carried frames marked known: 1 or 2 latent frames
            assert (y[:4, 1:2 if refert == 1 else 3] == 1).all(), msg

        for i in range(STEPS):
            cond, pred = r.calls[(k * STEPS + i) * passes]
            # integer timesteps on both sides
            assert cond["timestep"].dtype == torch.int64, msg
            assert cond["timestep"].tolist() == [int(schedule.timesteps[i])], msg
            assert rel(r.trace[f"seg{k}.x_in"][i], cond["hidden_states"][0, :16]) < 2e-5, (k, i, msg)
            assert rel(r.trace[f"seg{k}.pred_cond"][i], pred[0]) < 2e-5, (k, i, msg)
            if passes == 2:
                uncond, pred_u = r.calls[(k * STEPS + i) * passes + 1]
                assert (uncond["face_pixel_values"] == -1).all(), msg                  # the black face
                assert torch.equal(uncond["encoder_hidden_states"], _pad512(models.text.context_null)), msg
                assert rel(r.trace[f"seg{k}.pred_uncond"][i], pred_u[0]) < 2e-5, (k, i, msg)
            # the step (guided combination + UniPC) lands on the same latents
            assert rel(r.trace[f"seg{k}.latents_after_step"][i], r.step_latents[k * STEPS + i][0]) < 2e-5, (k, i, msg)

        if k + 1 < segments:                   # carried frames = the output frames at the next start
            start = (k + 1) * (r.clip_len - refert)
            carried = r.trace[f"seg{k + 1}.refert_frames"][0] * 0.5 + 0.5
            assert maxabs(carried, r.video[:, start:start + refert]) < 1e-4, (k, msg)

    ours = r.result.frames * 0.5 + 0.5
    assert rel(ours, r.video) < 1e-5 and maxabs(ours, r.video) < 1e-4, msg


def test_official_schedule_through_diffusers_scheduler(models):
    """diffusers with a scheduler on the official sigma grid == wanimate with its default schedule."""
    r = _run(models, mode="animate", refert=1, guide=1.0, official_schedule=True)
    assert r.options.steps == STEPS
    official = make_schedule("unipc", STEPS)
    assert [c["timestep"].item() for c, _ in r.calls[:STEPS]] == official.timesteps.tolist()
    ours = r.result.frames * 0.5 + 0.5
    assert rel(ours, r.video) < 1e-5 and maxabs(ours, r.video) < 1e-4, f"seed={r.seed}"


def test_dit_prediction_on_identical_inputs(models):
    """Our DiT on exactly the inputs diffusers' transformer got: the remaining gap is diffusers'
    float32 sinusoidal time embedding (difference 2). At t = 0 both embeddings are exact."""
    r = _cached_run(models, mode="animate", refert=1, guide=1.0)
    gaps = {}
    for kwargs, theirs in r.calls[:STEPS]:
        hidden = kwargs["hidden_states"]
        inputs = (hidden[:, :16], hidden[:, 16:], kwargs["pose_hidden_states"], kwargs["face_pixel_values"],
                  [kwargs["encoder_hidden_states"][0]], kwargs["encoder_hidden_states_image"])
        for t in (kwargs["timestep"], torch.tensor([0])):
            with torch.no_grad():
                ours = models.dit(inputs[0], t, *inputs[1:])
                ref = theirs if t.item() else models.transformer(**{**kwargs, "timestep": t, "return_dict": False})[0]
            gaps[t.item()] = rel(ours, ref)
        e_ours = sinusoidal_embedding(kwargs["timestep"], DIT.freq_dim)
        e_theirs = models.transformer.condition_embedder.timesteps_proj(kwargs["timestep"])
        assert 1e-6 < maxabs(e_ours, e_theirs) < 1e-4
    zero = torch.tensor([0])
    assert torch.equal(sinusoidal_embedding(zero, DIT.freq_dim),
                       models.transformer.condition_embedder.timesteps_proj(zero))
    assert max(gaps.values()) < 1e-5 and gaps[0] < 1e-6, gaps
    assert min(v for t, v in gaps.items() if t) > 3 * gaps[0], gaps


# ----------------------------------------------------------------------------------------------
# The segment plan


def test_pad_video_frames_is_pingpong(models):
    pipe = models.theirs()
    for n in range(2, 13):
        for target in (n, n + 1, 2 * n, 3 * n + 5, 40):
            assert pipe.pad_video_frames(list(range(n)), target) == pingpong(n, target), (n, target)


@pytest.mark.parametrize("n,clip_len,refert", [(2, 5, 1), (5, 5, 1), (6, 5, 1), (10, 5, 1), (13, 13, 5), (22, 13, 5)])
def test_segment_counts_and_frames(models, n, clip_len, refert):
    """Segment count, the pose frames each segment sees and the output length, over lengths that
    need no padding, some padding, and exactly one segment. 16x16 frames, one step."""
    r = _run(models, n=n, clip_len=clip_len, refert=refert, steps=1, h=16, w=16)
    plan = plan_segments(n, clip_len, refert)
    assert len(r.calls) == len(plan.segments) == r.result.segments, r.seed
    for k, (kwargs, _) in enumerate(r.calls):
        assert rel(r.trace[f"seg{k}.pose_latents"][0], kwargs["pose_hidden_states"][0]) < 1e-6, (k, r.seed)
    assert r.video.shape[1] == r.result.frames.shape[1] == n
    assert maxabs(r.result.frames * 0.5 + 0.5, r.video) < 1e-4, r.seed


@pytest.mark.parametrize("n,clip_len,refert,error", [(1, 5, 1, ValueError), (3, 13, 5, ValueError),
                                                     (5, 13, 5, ValueError), (1, 13, 5, IndexError)])
def test_inputs_up_to_refert_frames_fail_in_diffusers(models, n, clip_len, refert, error):
    """Difference 10: n_frames <= refert_num plans zero segments in diffusers (as officially);
    wanimate pads to one segment."""
    x = _inputs(_seed(), n, 16, 16)
    pipe = models.theirs()
    with pytest.raises(error), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe(image=PIL_Image.fromarray(x.reference), pose_video=_pil(x.pose), face_video=_pil(x.face),
             prompt_embeds=_pad512(models.text.context), height=16, width=16, segment_frame_length=clip_len,
             prev_segment_conditioning_frames=refert, num_inference_steps=1, output_type="pt")
    assert len(plan_segments(n, clip_len, refert).segments) == 1
    result = models.ours.generate(x.reference, ArraySource(x.pose), ArraySource(x.face),
                                  GenerateOptions(steps=1, seed=1, clip_len=clip_len, refert_num=refert),
                                  text=models.text)
    assert result.frames.shape[1] == n and result.segments == 1


def test_option_handling_differs(models):
    """Difference 15: clip_len 9 with refert_num 5: wanimate plans the official number of segments
    (one for these 6 frames); diffusers plans target // stride = one segment too many when
    refert_num > stride and stops on its own `assert`."""
    with pytest.raises(ValidationError, match="4n\\+1"):
        GenerateOptions(clip_len=7).validate()
    GenerateOptions(clip_len=9, refert_num=5).validate()
    assert len(plan_segments(6, 9, 5).segments) == 1
    x = _inputs(_seed(), 6, 16, 16)
    calls = []
    pipe = models.theirs()
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(AssertionError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe(image=PIL_Image.fromarray(x.reference), pose_video=_pil(x.pose), face_video=_pil(x.face),
                 prompt_embeds=_pad512(models.text.context), height=16, width=16, segment_frame_length=9,
                 prev_segment_conditioning_frames=5, num_inference_steps=1, output_type="pt")
    finally:
        handle.remove()
    assert len(calls) == 1                     # the one real segment ran, the extra one asserted


# ----------------------------------------------------------------------------------------------
# Schedules and the solver


def test_default_schedules_differ():
    """Difference 1, pinned at 20 steps."""
    scheduler = _scheduler()
    scheduler.set_timesteps(20)
    official = make_schedule("unipc", 20)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == [999, 989, 978, 965, 952, 937, 921, 902, 882, 859, 833, 803, 769, 729,
                                            682, 625, 556, 470, 359, 211]
    assert official.timesteps.tolist() == [999, 989, 978, 965, 952, 937, 920, 902, 882, 859, 833, 803, 768, 728,
                                           681, 624, 555, 468, 356, 208]
    assert scheduler.sigmas[-2].item() == pytest.approx(0.211622, abs=1e-6)
    assert official.sigmas[-2].item() == pytest.approx(0.208160, abs=1e-6)
    assert scheduler.sigmas[0].item() == pytest.approx(0.999999, abs=1e-6)
    assert official.sigmas[0].item() == pytest.approx(0.999800, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 20, 50])
def test_same_schedule_both_ways_and_same_solver(n):
    """(a) diffusers' schedule as a wanimate explicit list, (b) the official grid through
    diffusers' `set_timesteps(sigmas=...)`: bitwise. Then the UniPC updates agree bitwise."""
    scheduler = _scheduler()
    scheduler.set_timesteps(n)
    explicit = make_schedule("unipc", _diffusers_steps(n))
    assert torch.equal(explicit.sigmas, scheduler.sigmas) and torch.equal(explicit.timesteps, scheduler.timesteps)

    official = _scheduler(official=True)
    official.set_timesteps(n)
    ours = make_schedule("unipc", n)
    assert torch.equal(ours.sigmas, official.sigmas) and torch.equal(ours.timesteps, official.timesteps)

    g = torch.Generator().manual_seed(_seed())
    x_ours = torch.randn(1, 16, 3, 4, 6, generator=g)
    x_theirs = x_ours.clone()
    solver = make_solver(ours)
    for t in official.timesteps:
        v = torch.randn(x_ours.shape, generator=g)
        x_ours = solver.step(v, x_ours)
        x_theirs = official.step(v, t, x_theirs, return_dict=False)[0]
    assert torch.equal(x_ours, x_theirs)


# ----------------------------------------------------------------------------------------------
# Preprocessing differences


def test_pixel_and_mask_scaling():
    """Difference 3: float32 x/255*2-1 (diffusers) vs float64 x/127.5-1 (official), all 256 codes."""
    codes = np.arange(256, dtype=np.uint8)
    theirs = torch.from_numpy(codes.astype(np.float32) / 255.0) * 2 - 1
    ours = to_pixels(np.repeat(codes[:, None, None], 3, -1))[0, 0, :, 0]      # [256, 1, 3] image
    differ = theirs != ours
    assert int(differ.sum()) == 128 and maxabs(theirs, ours) < 1e-7
    m_theirs = 1 - torch.from_numpy(codes.astype(np.float32) / 255.0)
    m_ours = 1 - torch.from_numpy(codes.astype(np.float64) / 255.0).float()
    assert torch.equal(m_theirs, m_ours)


def test_reference_letterbox_differs(models):
    """Difference 4: identical for an H x W reference; a 1 px shift for an odd fitted width."""
    proc = models.theirs().vae_image_processor
    fill = lambda img, h, w: proc.preprocess(PIL_Image.fromarray(img), height=h, width=w, resize_mode="fill")[0]
    rng = np.random.default_rng(_seed())
    sized = _smooth_frames(rng, 1, H, W)[0]
    assert maxabs(fill(sized, H, W), to_pixels(sized)[0]) < 1e-7          # difference 3 only

    portrait = _smooth_frames(rng, 1, 45, 30)[0]           # fitted width int(32 / 45 * 30) = 21, odd
    theirs, ours = fill(portrait, H, W), to_pixels(letterbox(portrait, H, W))[0]
    columns = lambda x: (x > -1).any(0).any(0).nonzero().flatten()
    assert columns(theirs)[0].item() == columns(ours)[0].item() + 1       # W//2 - w//2 = 14 vs int(27 / 2) = 13
    assert rel(theirs, ours) > 0.1


def test_clip_preprocessing_differs():
    """Difference 5: CLIPImageProcessor (resize shortest side + center crop, PIL bicubic) on the raw
    image vs the official stretch of the letterboxed frame (torch bicubic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = transformers.CLIPImageProcessor()        # the laion ViT-H preprocessing
    image = np.asarray(PIL_Image.open(DATA.parent.parent / "examples" / "astronaut.jpg").convert("RGB"))
    assert tuple(processor.image_mean) == CLIPConfig().mean and tuple(processor.image_std) == CLIPConfig().std
    gaps = {}
    for name, ref, (h, w) in [("portrait->landscape", image[:, 64:448], (720, 1280)),
                              ("portrait->portrait", image[:, 64:448], (1280, 720)),
                              ("square->square", image, (512, 512))]:
        ref = np.ascontiguousarray(ref)
        theirs = processor(images=PIL_Image.fromarray(ref), return_tensors="pt")["pixel_values"]
        ours = clip_input(to_pixels(letterbox(ref, h, w)), CLIPConfig())
        assert theirs.shape == ours.shape == (1, 3, 224, 224)
        gaps[name] = rel(theirs, ours)
    assert gaps["portrait->landscape"] > 0.5 and gaps["portrait->portrait"] > 0.5, gaps
    assert 0.01 < gaps["square->square"] < 0.3, gaps          # resampling alone


def test_image_embeds_cannot_bypass_clip(models):
    """Difference 6: `image` and `image_embeds` are mutually exclusive, and `image` is required."""
    x = _inputs(_seed(), 5, 16, 16)
    embeds = torch.zeros(1, 257, DIT.image_dim)
    common = dict(pose_video=_pil(x.pose), face_video=_pil(x.face), prompt_embeds=_pad512(models.text.context),
                  height=16, width=16, segment_frame_length=5, num_inference_steps=1, output_type="pt")
    pipe = models.theirs()
    with pytest.raises(ValueError, match="Cannot forward both `image`"):
        pipe(image=PIL_Image.fromarray(x.reference), image_embeds=embeds, **common)
    with pytest.raises(Exception):
        pipe(image=None, image_embeds=embeds, **common)


def test_mask_uses_luma_not_red_channel(models):
    """Difference 8: equal for grey masks, not for coloured ones."""
    pipe = models.theirs()
    rng = np.random.default_rng(_seed())
    grey = np.repeat(rng.integers(0, 256, (3, H, W, 1), dtype=np.uint8), 3, -1)
    colour = rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8)
    for frames, equal in ((grey, True), (colour, False)):
        theirs = pipe.video_processor_for_mask.preprocess_video(_pil(frames), height=H, width=W)[0, 0]   # [T, H, W]
        official = torch.from_numpy(frames[..., 0].astype(np.float64) / 255.0).float()
        assert torch.equal(theirs, official) == equal
    assert maxabs(theirs, official) > 0.3


def test_face_resize_differs_for_non_native_crops(models):
    """Difference 9 (tiny preset only: official crops are the model's 512): 32 px crops into a
    16 px motion encoder, diffusers' PIL lanczos vs wanimate's area resize."""
    pipe = models.theirs()
    faces = np.random.default_rng(_seed()).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    resized = pipe.video_processor.preprocess_video(_pil(faces), height=16, width=16)     # [1, 3, 5, 16, 16]
    native = to_pixels(faces).permute(1, 0, 2, 3)[None]                                     # [1, 3, 5, 32, 32]
    with torch.no_grad():
        ours, theirs = models.dit.encode_motion(native), models.dit.encode_motion(resized)
    assert rel(ours[:, 1:], theirs[:, 1:]) > 5e-3


def test_bf16_residual_stream(models, tmp_path):
    """Difference 11: with bf16 weights diffusers rounds the residual to bf16 after every block;
    wanimate (like the official) keeps it fp32. Error vs the fp32 prediction over real steps."""
    pytest.importorskip("accelerate")          # from_pretrained needs it to keep fp32 modules
    r = _cached_run(models, mode="animate", refert=1, guide=1.0)
    models.transformer.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs16 = diffusers.WanAnimateTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert theirs16.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32   # _keep_in_fp32_modules
    ours16 = load_dit_state_dict(DIT, models.dit.state_dict(), dtype=torch.bfloat16)
    err_ours, err_theirs = [], []
    for kwargs, _ in r.calls:
        b16 = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        hidden = b16["hidden_states"].float()
        with torch.no_grad():
            ref = models.dit(hidden[:, :16], kwargs["timestep"], hidden[:, 16:], b16["pose_hidden_states"].float(),
                             b16["face_pixel_values"].float(), [b16["encoder_hidden_states"][0].float()],
                             b16["encoder_hidden_states_image"].float())
            ours = ours16(hidden[:, :16], kwargs["timestep"], hidden[:, 16:], b16["pose_hidden_states"],
                          b16["face_pixel_values"], [b16["encoder_hidden_states"][0]], b16["encoder_hidden_states_image"])
            theirs = theirs16(**{**b16, "return_dict": False})[0]
        err_ours.append(rel(ours, ref))
        err_theirs.append(rel(theirs, ref))
    mean_ours, mean_theirs = np.mean(err_ours), np.mean(err_theirs)
    assert 1e-3 < mean_ours < mean_theirs < 0.05, (err_ours, err_theirs)


def test_uint8_rounding_vs_truncation(models):
    """Item 13: the same float frames give the same 8-bit frames: diffusers' export
    ((x*255).astype(uint8) of its [0, 1] output), the official save_video and wanimate all truncate."""
    r = _cached_run(models, mode="animate", refert=1, guide=1.0)
    frames = r.result.frames                                       # [3, n, H, W] in [-1, 1]
    theirs = ((frames * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)
    ours = to_uint8_frames(frames)
    assert np.array_equal(ours, theirs)
