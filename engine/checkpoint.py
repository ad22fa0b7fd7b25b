"""Checkpoint directories: what they hold (`inspect`) and turning pickles into safetensors (`convert`).

The official Wan2.2-Animate-14B folder ships the DiT as safetensors but T5, CLIP, the VAE and
the relighting LoRA as pickles (`.pth`/`.ckpt`). The engine never unpickles at run time:
`convert` loads each pickle once with `torch.load(weights_only=True)` inside a child process
(so a hostile file can at most take down that child), writes `<stem>.safetensors` beside it,
and writes `wanimate-manifest.json` with the SHA-256 and size of every weight file. Loaders
refuse converted components that are missing from the manifest or do not match it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from .errors import CheckpointError
from .safetensors_io import MANIFEST_NAME, read_header, sha256_file, write_manifest


@dataclass(frozen=True)
class Component:
    name: str
    official: str                 # file in the official layout (pickle unless .safetensors)
    diffusers: str | None         # folder in the -Diffusers layout
    required: bool = True


COMPONENTS = (
    Component("dit", "diffusion_pytorch_model*.safetensors", "transformer"),
    Component("t5", "models_t5_umt5-xxl-enc-bf16.pth", "text_encoder"),
    Component("t5_tokenizer", "google/umt5-xxl", "tokenizer"),
    Component("clip", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "image_encoder"),
    Component("vae", "Wan2.1_VAE.pth", "vae"),
    Component("relighting_lora", "relighting_lora.ckpt", None, required=False),
    Component("det", "process_checkpoint/det/yolov10m.onnx", None, required=False),
    Component("pose2d", "process_checkpoint/pose2d/vitpose_h_wholebody.onnx", None, required=False),
    Component("sam2", "process_checkpoint/sam2/sam2_hiera_large.pt", None, required=False),
)
PICKLED = {"t5", "clip", "vae", "relighting_lora"}


def converted_path(ckpt_dir: Path, component: Component) -> Path:
    return Path(ckpt_dir) / (Path(component.official).stem + ".safetensors")


# ----------------------------------------------------------------------------------------------
# convert


_CHILD = r"""
import json, sys, torch
from wanimate.engine.safetensors_io import save_file
src, dst = sys.argv[1], sys.argv[2]
obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]          # relighting_lora.ckpt wraps its tensors
if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise SystemExit("not a flat {name: tensor} state dict")
digest = save_file(obj, dst, metadata={"converted_from": src.rsplit("/", 1)[-1], "format": "pt"})
print(json.dumps({"sha256": digest, "n_tensors": len(obj)}))
"""


def convert_pickle(src: Path, dst: Path, timeout_s: float = 3600.0) -> dict:
    """One pickle -> safetensors, in a child process with weights_only=True."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CheckpointError(f"{src}: could not convert with torch.load(weights_only=True): {tail[0]} "
                              "(a pickle that needs arbitrary code is refused on purpose)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convert(ckpt_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Convert every pickled component and write the manifest of all weight files. Idempotent:
    a pickle whose safetensors twin already exists is not converted again."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    say = progress or (lambda s: None)
    for comp in COMPONENTS:
        if comp.name not in PICKLED:
            continue
        src = ckpt_dir / comp.official
        dst = converted_path(ckpt_dir, comp)
        if src.exists() and not dst.exists():
            say(f"converting {src.name} -> {dst.name}")
            convert_pickle(src, dst)
    files = {}
    for path in sorted(ckpt_dir.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".onnx") and not path.name.startswith("."):
            rel = str(path.relative_to(ckpt_dir))
            say(f"hashing {rel}")
            if path.suffix == ".safetensors":
                read_header(path)             # refuse to vouch for a corrupt file
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if not files:
        raise CheckpointError(f"{ckpt_dir}: no weight files to record (expected the Wan2.2-Animate-14B layout)")
    return write_manifest(ckpt_dir, files, extra={"created_by": "wanimate convert"})


# ----------------------------------------------------------------------------------------------
# inspect


@dataclass
class ComponentReport:
    name: str
    status: str                    # "ok", "missing", "needs convert", "optional, absent"
    files: list[str] = field(default_factory=list)
    params: int = 0
    gpu_gb_bf16: float = 0.0
    gpu_gb_fp8: float = 0.0
    note: str = ""


@dataclass
class InspectReport:
    directory: Path
    layout: str
    components: list[ComponentReport]
    manifest: bool

    @property
    def missing(self) -> list[str]:
        return [c.name for c in self.components if c.status in ("missing", "needs convert")]

    def format(self) -> str:
        rows = [("component", "status", "params", "GPU GB bf16", "GPU GB fp8", "files / note")]
        for c in self.components:
            rows.append((c.name, c.status, f"{c.params / 1e9:.3f}B" if c.params else "-",
                         f"{c.gpu_gb_bf16:.2f}" if c.params else "-", f"{c.gpu_gb_fp8:.2f}" if c.params else "-",
                         (", ".join(c.files[:3]) + (f" (+{len(c.files) - 3})" if len(c.files) > 3 else "")) +
                         (f"  {c.note}" if c.note else "")))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{self.directory}  layout: {self.layout}  manifest: {'yes' if self.manifest else 'no (run wanimate convert)'}"]
        lines += ["  ".join(v.ljust(n) for v, n in zip(r, w)) for r in rows]
        lines.append("missing: " + (", ".join(self.missing) if self.missing else "nothing"))
        return "\n".join(lines)


def _safetensors_params(files: list[Path], key_filter: Callable[[str], bool] = lambda k: True) -> int:
    return sum(math.prod(info.shape) for f in files for k, info in read_header(f).tensors.items() if key_filter(k))


# Memory each component needs on the GPU. FP8 keeps the layers the quantization policy exempts in
# bf16 (embeddings, modulation, head, norms: ~1% of the DiT) and stores every linear at 1 byte.
_BYTES = {"dit": (2.0, 1.0), "t5": (2.0, 1.0), "clip": (2.0, 2.0), "vae": (4.0, 4.0)}


def inspect(ckpt_dir: Path) -> InspectReport:
    from .clip import clip_key_filter
    from .loader import find_dit
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    layout = "diffusers" if (ckpt_dir / "transformer").is_dir() else "official"
    reports = []
    for comp in COMPONENTS:
        r = ComponentReport(comp.name, "missing")
        try:
            if comp.name == "dit":
                ck = find_dit(ckpt_dir)
                r.files = [f.name for f in ck.files]
                r.params = _safetensors_params(ck.files)
                r.status = "ok"
            elif layout == "diffusers" and comp.diffusers:
                folder = ckpt_dir / comp.diffusers
                if folder.is_dir():
                    files = sorted(folder.glob("*.safetensors"))
                    r.files = [f"{comp.diffusers}/{f.name}" for f in files] or [comp.diffusers + "/"]
                    r.params = _safetensors_params(files) if files else 0
                    r.status = "ok"
            else:
                path = ckpt_dir / comp.official
                if comp.name in PICKLED:
                    st = converted_path(ckpt_dir, comp)
                    if st.exists():
                        keep = (lambda k: clip_key_filter(k)) if comp.name == "clip" else (lambda k: True)
                        r.files, r.params, r.status = [st.name], _safetensors_params([st], keep), "ok"
                        if comp.name == "clip":
                            r.note = "visual tower only (text tower unused)"
                    elif path.exists():
                        r.files, r.status = [path.name], "needs convert"
                        r.note = "pickle: run `wanimate convert DIR`"
                elif path.exists():
                    r.files, r.status = [comp.official], "ok"
        except CheckpointError as e:
            r.status, r.note = "corrupt", str(e).splitlines()[0]
        if r.status == "missing" and not comp.required:
            r.status = "optional, absent"
        if r.params:
            b16, b8 = _BYTES.get(comp.name, (2.0, 2.0))
            r.gpu_gb_bf16, r.gpu_gb_fp8 = r.params * b16 / 1e9, r.params * b8 / 1e9
        reports.append(r)
    return InspectReport(ckpt_dir, layout, reports, (ckpt_dir / MANIFEST_NAME).exists())
