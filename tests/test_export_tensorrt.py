"""export/tensorrt.py: the engine cache and its hash checks for real; the builder and runtime
through a fake `trt` module object (tests/fake_tensorrt.py) at the TensorRT boundary; the real
TensorRT only where it is installed with a GPU (never on our machines)."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fake_tensorrt import make_fake_trt  # noqa: E402
from wanimate.engine.errors import CheckpointError, ValidationError  # noqa: E402
from wanimate.export.onnx import export_pose, export_vae, load_vae_source  # noqa: E402
from wanimate.export.runtime import TensorRTVAE, make_vae_backend  # noqa: E402
from wanimate.export.tensorrt import (EngineCache, EngineIntegrityError, EngineKey, EngineRunner,  # noqa: E402
                                      TensorRTError, build_engine, build_or_load,
                                      compile_dit_blocks_tensorrt, dynamic_batch_profile, import_tensorrt,
                                      make_key)

GPU = ("Fake H100", "9.0")


def _model(graph):
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _rms_model(batch="batch"):
    """x [B,4,3] -> x / ||x||_2 over dim 1 * 2 (a ReduceL2 that fp16 builds must keep in fp32)."""
    nodes = [helper.make_node("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1),
             helper.make_node("Div", ["x", "n"], ["u"]),
             helper.make_node("Mul", ["u", "two"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 3])],
                              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    return _model(graph)


@pytest.fixture
def rms_onnx(tmp_path):
    path = tmp_path / "rms.onnx"
    onnx.save_model(_rms_model(), str(path))
    return path


def _key(**changes) -> EngineKey:
    base = EngineKey("vae_decode_step", "ab" * 32, "NVIDIA H100 80GB HBM3", "9.0", "10.13.0", "fp16",
                     ((("x", (1, 4), (2, 4), (8, 4)),),))
    return replace(base, **changes)


# ------------------------------------------------------------------------------ cache and hashes

def test_key_digest_depends_on_every_field():
    digests = {_key().digest}
    for change in (dict(name="vae_decode_first"), dict(onnx_sha256="cd" * 32), dict(gpu="NVIDIA H200"),
                   dict(compute_capability="8.9"), dict(tensorrt="10.14.0"), dict(precision="bf16"),
                   dict(profiles=((("x", (1, 4), (4, 4), (8, 4)),),))):
        digests.add(_key(**change).digest)
    assert len(digests) == 8
    assert _key().digest == _key().digest


def test_cache_round_trip_and_integrity_errors(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    key = _key()
    assert cache.lookup(key) is None
    stored = cache.store(key, b"engine-bytes")
    assert stored.path.name.startswith("vae_decode_step-") and stored.path.suffix == ".engine"
    side = json.loads(EngineCache.sidecar(stored.path).read_text())
    assert side["key"]["gpu"] == key.gpu and len(side["sha256"]) == 64
    assert cache.lookup(key).engine_bytes == b"engine-bytes"

    # A flipped byte: the hash no longer matches the sidecar.
    stored.path.write_bytes(b"engine-bytez")
    with pytest.raises(EngineIntegrityError, match="SHA-256"):
        cache.lookup(key)
    # An engine for another key renamed into place: the sidecar's key differs.
    other = cache.store(_key(precision="bf16"), b"other")
    os.replace(other.path, stored.path)
    os.replace(EngineCache.sidecar(other.path), EngineCache.sidecar(stored.path))
    with pytest.raises(EngineIntegrityError, match="precision"):
        cache.lookup(key)
    # A file dropped in without a sidecar is unknown.
    EngineCache.sidecar(stored.path).unlink()
    with pytest.raises(EngineIntegrityError, match="unknown engine"):
        cache.lookup(key)
    # An edited sidecar (hash of the edited engine put in, key hash not updated) is refused.
    good = cache.store(key, b"engine-bytes")
    record = json.loads(EngineCache.sidecar(good.path).read_text())
    record["key"]["precision"] = "fp32"
    EngineCache.sidecar(good.path).write_text(json.dumps(record))
    with pytest.raises(EngineIntegrityError, match="sidecar"):
        cache.verify(good.path)


def test_cache_refuses_shared_writable_files_and_symlinks(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    stored = cache.store(_key(), b"x")
    os.chmod(stored.path, 0o666)
    with pytest.raises(EngineIntegrityError, match="writable"):
        cache.lookup(_key())
    os.chmod(stored.path, 0o600)
    os.chmod(cache.root, 0o777)
    with pytest.raises(EngineIntegrityError, match="writable"):
        cache.lookup(_key())
    os.chmod(cache.root, 0o700)
    real = stored.path.with_name("real.engine")
    os.replace(stored.path, real)
    os.symlink(real.name, stored.path)
    with pytest.raises(EngineIntegrityError, match="symlink"):
        cache.lookup(_key())


# ------------------------------------------------------------------------------ building (fake trt)

@pytest.mark.parametrize("precision, on, off", [
    ("fp32", [], ["TF32", "FP16"]), ("tf32", ["TF32"], ["FP16"]), ("fp16", ["FP16", "PREFER_PRECISION_CONSTRAINTS"], []),
    ("bf16", ["BF16"], ["FP16"]), ("fp8", ["FP8", "FP16"], []),
])
def test_builder_flags_per_precision(rms_onnx, precision, on, off):
    trt = make_fake_trt()
    data = build_engine(rms_onnx, precision=precision, trt=trt, profiles={"x": ((1, 4, 3), (2, 4, 3), (4, 4, 3))})
    settings = trt.builds[-1]
    assert set(on) <= set(settings["flags"]) and not set(off) & set(settings["flags"])
    assert settings["profiles"] == [{"x": [[1, 4, 3], [2, 4, 3], [4, 4, 3]]}]
    assert settings["pinned"] == ([] if precision in ("fp32", "tf32") else ["ReduceL2_0"])
    assert data.startswith(b"FAKETRT1")


def test_builder_errors(rms_onnx, tmp_path):
    with pytest.raises(ValidationError, match="8.9"):
        build_engine(rms_onnx, precision="fp8", trt=make_fake_trt(), compute_capability="8.0")
    with pytest.raises(ValidationError, match="precision"):
        build_engine(rms_onnx, precision="int3", trt=make_fake_trt())
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        build_engine(bad, trt=make_fake_trt())
    trt = make_fake_trt()
    trt.fail_builds = True
    with pytest.raises(TensorRTError, match="could not build"):
        build_engine(rms_onnx, trt=trt)
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        build_engine(rms_onnx, trt=make_fake_trt(), profiles={"x": ((4, 4, 3), (2, 4, 3), (8, 4, 3))})


def test_build_or_load_builds_once_and_verifies_before_deserialising(rms_onnx, tmp_path):
    trt = make_fake_trt()
    cache = EngineCache(tmp_path / "engines")
    profile = {"x": ((1, 4, 3), (2, 4, 3), (4, 4, 3))}
    first = build_or_load(cache, rms_onnx, precision="fp16", profiles=profile, trt=trt, gpu=GPU)
    again = build_or_load(cache, rms_onnx, precision="fp16", profiles=profile, trt=trt, gpu=GPU)
    assert len(trt.builds) == 1 and again.engine_bytes == first.engine_bytes and again.key == first.key
    timing = list(cache.root.glob("timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"tactic;"
    # Another precision is another engine; the timing cache is read and extended, not restarted.
    build_or_load(cache, rms_onnx, precision="bf16", profiles=profile, trt=trt, gpu=GPU)
    assert len(trt.builds) == 2 and timing[0].read_bytes() == b"tactic;tactic;"
    # A changed engine is refused before the runtime sees it.
    first.path.write_bytes(first.engine_bytes[:-1] + b"!")
    with pytest.raises(EngineIntegrityError):
        build_or_load(cache, rms_onnx, precision="fp16", profiles=profile, trt=trt, gpu=GPU)
    assert trt.deserialized == []
    # A new ONNX file (other weights) is a new key.
    onnx.save_model(_rms_model(batch=2), str(rms_onnx))
    fresh = build_or_load(cache, rms_onnx, precision="fp16", trt=trt, gpu=GPU)
    assert fresh.key.onnx_sha256 != first.key.onnx_sha256 and len(trt.builds) == 3


def test_make_key_reads_the_tensorrt_version(rms_onnx):
    key = make_key("rms", rms_onnx, "fp16", trt=make_fake_trt("10.7.1"), gpu=GPU)
    assert key.tensorrt == "10.7.1" and key.gpu == "Fake H100" and key.compute_capability == "9.0"


# ------------------------------------------------------------------------------ runtime (fake trt)

def test_runner_binds_tensors_and_respects_the_profile(rms_onnx, tmp_path):
    trt = make_fake_trt()
    model = onnx.load(str(rms_onnx))
    profile = dynamic_batch_profile(model, max_batch=4, opt_batch=2)
    assert profile == {"x": ((1, 4, 3), (2, 4, 3), (4, 4, 3))}
    entry = build_or_load(EngineCache(tmp_path), rms_onnx, precision="fp16", profiles=profile, trt=trt, gpu=GPU)
    runner = EngineRunner(entry.engine_bytes, device="cpu", trt=trt)
    assert runner.inputs == ["x"] and runner.outputs == ["y"]
    x = torch.randn(3, 4, 3)
    y = runner({"x": x})["y"]
    torch.testing.assert_close(y, 2 * x / x.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    y2 = runner([x[:1]])["y"]                                     # positional feeds, another batch
    torch.testing.assert_close(y2, y[:1])
    with pytest.raises(ValidationError, match="profile"):
        runner({"x": torch.randn(5, 4, 3)})
    with pytest.raises(ValidationError, match="float32"):
        runner({"x": x.double()})
    with pytest.raises(ValidationError, match="missing"):
        runner({"z": x})
    strict = make_fake_trt()
    strict.accepts_host_pointers = False                           # like the real TensorRT
    with pytest.raises(ValidationError, match="CUDA"):
        EngineRunner(entry.engine_bytes, device="cpu", trt=strict)
    with pytest.raises(TensorRTError, match="deserialise"):
        EngineRunner(b"garbage", device="cpu", trt=trt)


@pytest.fixture(scope="module")
def trt_vae(tmp_path_factory):
    """The tiny VAE's decoder graphs exported and built into fake fp32 engines by export_vae."""
    vae = load_vae_source("recipe:tiny")
    out = tmp_path_factory.mktemp("trt_vae")
    trt = make_fake_trt()
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [manifest] = export_vae(vae, out, format="tensorrt", precision="fp32", resolution=(16, 16),
                                parts=("decode",), trt=trt, gpu=GPU)
    return vae, out / "16x16", trt, manifest


def test_export_vae_builds_engines_for_each_graph(trt_vae):
    _, d, trt, manifest = trt_vae
    assert set(manifest["engines"]) == {"decode_first", "decode_step"}
    assert manifest["verified_rel_l2"]["decode_rel_l2"] <= 1e-4
    assert len(trt.builds) == 2 and all("TF32" not in b["flags"] for b in trt.builds)
    for path in manifest["engines"].values():
        assert EngineCache(d / "engines").verify(path).key.precision == "fp32"


def test_tensorrt_vae_backend_streams_like_the_torch_vae(trt_vae):
    vae, d, trt, _ = trt_vae
    backend = TensorRTVAE(d, trt=trt, device="cpu", precision="fp32", gpu=GPU)
    latent = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    chunks = list(backend.decode_stream(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    ref = vae.decode(latent)
    got = torch.cat(chunks, dim=2)
    assert float((got - ref).norm() / ref.norm()) <= 1e-4
    assert len(trt.builds) == 2                     # the engines of export_vae were reused
    with pytest.raises(ValidationError, match="encode"):
        backend.encode(torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(ValidationError, match="cache folder"):
        make_vae_backend(vae, "tensorrt")


def test_export_pose_tensorrt_builds_dynamic_batch_engines(tmp_path):
    trt = make_fake_trt()
    onnx.save_model(_rms_model(batch=1), str(tmp_path / "pose_in.onnx"))
    out = export_pose(None, tmp_path / "pose_in.onnx", tmp_path / "out", format="tensorrt", max_batch=8,
                      trt=trt, gpu=GPU)
    assert trt.builds[0]["profiles"] == [{"x": [[1, 4, 3], [8, 4, 3], [8, 4, 3]]}]
    runner = EngineRunner(EngineCache(tmp_path / "out" / "engines").verify(out["pose"]["engine"]).engine_bytes,
                          device="cpu", trt=trt)
    assert runner({"x": torch.ones(6, 4, 3)})["y"].shape == (6, 4, 3)


# ------------------------------------------------------------------------------ without TensorRT

def test_missing_tensorrt_is_a_typed_error():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(TensorRTError, match="not installed"):
        import_tensorrt()


def test_torch_tensorrt_path_is_guarded():
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(TensorRTError, match="torch-tensorrt"):
        compile_dit_blocks_tensorrt(torch.nn.Module(), [])


@pytest.mark.gpu
def test_real_tensorrt_engine_runs(rms_onnx, tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    profile = {"x": ((1, 4, 3), (2, 4, 3), (4, 4, 3))}
    entry = build_or_load(EngineCache(tmp_path), rms_onnx, precision="fp32", profiles=profile, trt=trt)
    runner = EngineRunner(entry.engine_bytes, device="cuda", trt=trt)
    x = torch.randn(3, 4, 3, device="cuda")
    torch.testing.assert_close(runner({"x": x})["y"], 2 * x / x.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)
