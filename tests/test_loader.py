"""Checkpoint loading: both layouts load into the same module; every failure is a typed error
that names the offending key and file, raised before any weight is used."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from wanimate.engine.config import DiTConfig
from wanimate.engine.errors import CheckpointError
from wanimate.engine.loader import diffusers_config, find_dit, load_dit, official_to_diffusers, recipe_dit
from wanimate.engine.safetensors_io import (MANIFEST_NAME, read_header, read_tensors, save_file, sha256_file,
                                            write_manifest)

CFG = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=5, text_dim=16, image_dim=16,
                motion_size=8, motion_width=16, motion_encoder_dim=16, face_hidden=16)
OFFICIAL_ARGS = {"dim": 32, "ffn_dim": 48, "num_heads": 2, "num_layers": 5, "text_dim": 16}


def _reference():
    return recipe_dit(CFG, base_seed=77)


def write_checkpoint(directory, state, *, layout="official", shards=3, config=None):
    """Write `state` as a sharded safetensors checkpoint with an index and config.json."""
    target = directory if layout == "official" else directory / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, target / name)
        weight_map.update({k: name for k in part})
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (target / "config.json").write_text(json.dumps(config or {}))
    return target


def _official_ckpt(tmp_path, state=None):
    ref = _reference()
    state = dict(ref.state_dict()) if state is None else state
    write_checkpoint(tmp_path, state, config={**OFFICIAL_ARGS})
    return ref


def _load(tmp_path, **kw):
    return load_dit(tmp_path, dtype=torch.float32, **kw)


@pytest.fixture
def tiny_official(monkeypatch):
    # The official config.json cannot express the shrunken motion encoder, so the loader is
    # pointed at CFG for these tests (find_dit's other logic is unchanged).
    import wanimate.engine.loader as L
    real = L.find_dit

    def fake(ckpt_dir):
        ck = real(ckpt_dir)
        return L.DiTCheckpoint(ck.layout, ck.directory, ck.files, CFG)
    monkeypatch.setattr(L, "find_dit", fake)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_official_layout_roundtrip(tmp_path, tiny_official):
    ref = _official_ckpt(tmp_path)
    _same(_load(tmp_path), ref)


def test_diffusers_layout_roundtrip(tmp_path):
    ref = _reference()
    write_checkpoint(tmp_path, official_to_diffusers(dict(ref.state_dict()), CFG), layout="diffusers", shards=4,
                     config=diffusers_config(CFG))
    ck = find_dit(tmp_path)
    assert ck.layout == "diffusers" and ck.config == CFG
    _same(_load(tmp_path), ref)


def test_bf16_default_dtype(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    model = load_dit(tmp_path)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_and_unexpected_keys_are_all_named(tmp_path, tiny_official):
    state = dict(_reference().state_dict())
    del state["blocks.2.ffn.0.weight"], state["head.head.bias"]
    state["blocks.9.self_attn.q.weight"] = torch.zeros(2, 2)
    write_checkpoint(tmp_path, state, config=OFFICIAL_ARGS)
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "blocks.2.ffn.0.weight" in msg and "head.head.bias" in msg
    assert "blocks.9.self_attn.q.weight" in msg and "diffusion_pytorch_model-" in msg


def test_shape_and_dtype_mismatch_named(tmp_path, tiny_official):
    state = dict(_reference().state_dict())
    state["blocks.1.self_attn.k.weight"] = torch.zeros(32, 31)
    state["blocks.0.self_attn.o.bias"] = torch.zeros(32, dtype=torch.int32)
    write_checkpoint(tmp_path, state, config=OFFICIAL_ARGS)
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "blocks.1.self_attn.k.weight" in msg and "[32, 32]" in msg and "[32, 31]" in msg
    assert "blocks.0.self_attn.o.bias" in msg and "int32" in msg


def test_nan_and_inf_rejected(tmp_path, tiny_official):
    state = dict(_reference().state_dict())
    bad = state["blocks.3.cross_attn.v.weight"].clone()
    bad[0, 0] = float("nan")
    bad[1, 1] = float("inf")
    state["blocks.3.cross_attn.v.weight"] = bad
    write_checkpoint(tmp_path, state, config=OFFICIAL_ARGS)
    with pytest.raises(CheckpointError, match=r"blocks\.3\.cross_attn\.v\.weight.*2 NaN/Inf"):
        _load(tmp_path)


def test_key_in_two_shards(tmp_path, tiny_official):
    ref = _official_ckpt(tmp_path)
    extra = tmp_path / "diffusion_pytorch_model-00004-of-00004.safetensors"
    save_file({"head.head.weight": ref.state_dict()["head.head.weight"]}, extra)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["x"] = extra.name
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"head\.head\.weight.*two shards"):
        _load(tmp_path)


def _shard(tmp_path):
    return sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))[0]


def test_truncated_file(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    f = _shard(tmp_path)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"{f.name}.*truncated"):
        _load(tmp_path)


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_overlapping_offsets(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    f = _shard(tmp_path)

    def overlap(h):
        entries = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        (b0, k0), (b1, k1) = entries[0], entries[1]
        span = h[k1]["data_offsets"][1] - h[k1]["data_offsets"][0]
        h[k1]["data_offsets"] = [b0, b0 + span]       # second tensor now reads the first's bytes
    _rewrite_header(f, overlap)
    with pytest.raises(CheckpointError, match=rf"{f.name}.*(overlaps|gap)"):
        _load(tmp_path)


def test_span_does_not_match_shape(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    f = _shard(tmp_path)

    def lie(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["shape"] = [h[k]["shape"][0] + 1] + h[k]["shape"][1:]
    _rewrite_header(f, lie)
    with pytest.raises(CheckpointError, match=rf"{f.name}.*byte span"):
        _load(tmp_path)


def test_corrupt_header(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    f = _shard(tmp_path)
    raw = bytearray(f.read_bytes())
    raw[10:14] = b"\xff\xfe{{"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*not valid JSON"):
        _load(tmp_path)
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match=r"exceeds"):
        read_header(f)


def test_duplicate_names_in_header(tmp_path):
    f = tmp_path / "dup.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="duplicate tensor name 'a'"):
        read_header(f)


def test_manifest_hash_mismatch_refused(tmp_path, tiny_official):
    _official_ckpt(tmp_path)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in tmp_path.glob("*.safetensors")}
    write_manifest(tmp_path, files)
    _load(tmp_path)                                  # intact: loads
    f = _shard(tmp_path)
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01                                  # one flipped bit in the data, header intact
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*SHA-256"):
        _load(tmp_path)


def test_tampered_file_yields_nothing(tmp_path):
    f = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(4)}, f)
    with pytest.raises(CheckpointError):
        next(read_tensors(read_header(f), expected_sha256="0" * 64))


def test_no_weights_found(tmp_path):
    with pytest.raises(CheckpointError, match="no DiT weights found"):
        find_dit(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        find_dit(tmp_path / "nope")


def test_blur_buffer_must_hold_the_fixed_kernel(tmp_path, tiny_official):
    state = dict(_reference().state_dict())
    key = next(k for k in state if k.endswith(".kernel"))
    state[key] = state[key] * 2
    write_checkpoint(tmp_path, state, config=OFFICIAL_ARGS)
    with pytest.raises(CheckpointError, match="fixed blur kernel"):
        _load(tmp_path)


def test_unsupported_official_arguments():
    from wanimate.engine.errors import ValidationError
    with pytest.raises(ValidationError, match="window_size"):
        DiTConfig.from_official({"window_size": [8, 8]})
    with pytest.raises(ValidationError, match="unknown"):
        DiTConfig.from_official({"mystery": 1})
