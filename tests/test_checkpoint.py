"""`wanimate convert` and `wanimate inspect`: pickles become safetensors in a child process with
weights_only=True, a hostile pickle is refused without running its payload, the manifest records
every weight file, and inspect reports what is there and what is missing."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from wanimate.cli import app
from wanimate.engine.checkpoint import convert, inspect
from wanimate.engine.errors import CheckpointError
from wanimate.engine.safetensors_io import MANIFEST_NAME, read_header, read_manifest, sha256_file


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        # Unpickling this creates a file: the sentinel proves whether code ran.
        return (open, (self.path, "w"))


def test_convert_pickles_and_write_manifest(tmp_path):
    torch.save({"encoder.conv1.weight": torch.randn(4, 3), "encoder.conv1.bias": torch.randn(4)}, tmp_path / "Wan2.1_VAE.pth")
    torch.save({"state_dict": {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 8)}}, tmp_path / "relighting_lora.ckpt")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")   # replaced below
    from wanimate.engine.safetensors_io import save_file
    save_file({"head.head.weight": torch.randn(2, 2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    convert(tmp_path)
    vae = read_header(tmp_path / "Wan2.1_VAE.safetensors")
    assert set(vae.tensors) == {"encoder.conv1.weight", "encoder.conv1.bias"}
    assert set(read_header(tmp_path / "relighting_lora.safetensors").tensors) == {"blocks.0.self_attn.q.lora_A.weight"}
    manifest = read_manifest(tmp_path)
    assert set(manifest) == {"Wan2.1_VAE.safetensors", "relighting_lora.safetensors", "diffusion_pytorch_model.safetensors"}
    for rel, entry in manifest.items():
        assert entry["sha256"] == sha256_file(tmp_path / rel)


def test_hostile_pickle_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    with open(tmp_path / "Wan2.1_VAE.pth", "wb") as f:
        pickle.dump({"w": _Payload(str(sentinel))}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert(tmp_path)
    assert not sentinel.exists()
    assert not (tmp_path / "Wan2.1_VAE.safetensors").exists()


def test_inspect_reports_missing_and_memory(tmp_path):
    from wanimate.engine.safetensors_io import save_file
    save_file({"head.head.weight": torch.zeros(64, 5120, dtype=torch.bfloat16)}, tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save({"encoder.conv1.weight": torch.randn(4, 3)}, tmp_path / "Wan2.1_VAE.pth")
    report = inspect(tmp_path)
    by = {c.name: c for c in report.components}
    assert by["dit"].status == "ok" and by["dit"].params == 64 * 5120
    assert by["vae"].status == "needs convert"
    assert by["t5"].status == "missing" and by["relighting_lora"].status == "optional, absent"
    assert set(report.missing) >= {"t5", "clip", "vae", "t5_tokenizer"}
    assert abs(by["dit"].gpu_gb_bf16 - 64 * 5120 * 2 / 1e9) < 1e-12
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "needs convert" in result.output and "missing:" in result.output


def test_inspect_flags_corrupt_dit(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{")
    report = inspect(tmp_path)
    assert report.components[0].status == "corrupt"


def test_cli_convert_errors_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a directory" in result.output
