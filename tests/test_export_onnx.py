"""export/onnx.py and export/runtime.py: VAE step graphs against the torch VAE (ONNX Runtime, CPU),
the ONNX VAE backend, external-data hygiene, dynamic-batch surgery for the preprocessing models."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from helpers import FIXTURES, load_meta  # noqa: E402
from wanimate.engine.errors import CheckpointError, ValidationError  # noqa: E402
from wanimate.engine.vae import Tiling  # noqa: E402
from wanimate.export.onnx import (check_external_data, export_pose, export_vae, load_onnx,  # noqa: E402
                                  load_vae_source, make_batch_dynamic, open_session, read_manifest,
                                  verify_vae_export)
from wanimate.export.runtime import OnnxVAE, make_vae_backend  # noqa: E402

H, W = 16, 24     # pixels; latent 2x3 - the smallest resolution that keeps every level >= 1 pixel


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_vae():
    return load_vae_source("recipe:tiny")


@pytest.fixture(scope="module")
def exported(tiny_vae, tmp_path_factory):
    """The tiny VAE's graphs at 16x24, exported lazily by the onnx backend on first use."""
    cache = tmp_path_factory.mktemp("vae_cache")
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = make_vae_backend(tiny_vae, "onnx", cache)
        latent = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
        first = backend.decode(latent, clamp=False)
    dirs = list(cache.glob("*/*x*"))
    assert len(dirs) == 1
    return {"dir": dirs[0], "cache": cache, "backend": backend, "latent": latent, "first": first}


def test_step_graphs_match_torch_decode_and_encode(tiny_vae, exported):
    errors = verify_vae_export(tiny_vae, exported["dir"], frames=3, seed=5)
    assert errors["decode_rel_l2"] <= 1e-4 and errors["encode_rel_l2"] <= 1e-4, errors
    # The lazily exported backend's output too, against the torch decode of the same latent.
    ref = tiny_vae.decode(exported["latent"], clamp=False)
    assert rel_l2(exported["first"], ref) <= 1e-4


def test_manifest_describes_a_fixed_shape_cache(exported):
    m = read_manifest(exported["dir"])
    assert m["resolution"] == [H, W] and m["opset"] >= 17
    for part, frames_out, y_shape in (("decode", 4, [1, 3, 4, H, W]), ("encode", 1, [1, 16, 1, H // 8, W // 8])):
        first, step = m["graphs"][f"{part}_first"], m["graphs"][f"{part}_step"]
        assert [i["name"] for i in first["inputs"]] == ["x"]
        cache_in = [i["shape"] for i in step["inputs"][1:]]
        assert cache_in == [o["shape"] for o in step["outputs"][1:]] == [o["shape"] for o in first["outputs"][1:]]
        assert len(cache_in) > 5 and all(s[2] in (1, 2) for s in cache_in)   # 2 past frames (1 for time downsampling)
        assert step["outputs"][0]["shape"] == y_shape
    assert m["graphs"]["decode_first"]["outputs"][0]["shape"] == [1, 3, 1, H, W]
    # The steady step's cache is the first step's: one graph serves every later step.
    onnx.checker.check_model(str(exported["dir"] / "decode_step.onnx"))


def test_onnx_backend_has_the_wanvae_interface(tiny_vae, exported):
    backend = OnnxVAE(exported["dir"])
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 16, 3, H // 8, W // 8, generator=g) * 1.5        # batch 2: two streams
    chunks = list(backend.decode_stream(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    got = torch.cat(chunks, dim=2)
    ref = tiny_vae.decode(latent)
    assert got.abs().max() <= 1.0 and rel_l2(got, ref) <= 1e-4
    video = (torch.randn(2, 3, 9, H, W, generator=g) * 0.6).clamp(-1, 1)
    assert rel_l2(backend.encode(video.to(torch.bfloat16)), tiny_vae.encode(video.to(torch.bfloat16))) <= 1e-4
    assert backend.dtype == torch.float32 and backend.config == tiny_vae.config
    with pytest.raises(ValidationError, match="export_vae"):
        backend.decode(torch.randn(1, 16, 2, 3, 3))
    with pytest.raises(ValidationError, match="tile"):
        backend.decode(latent, tiling=Tiling(2, 1))
    with pytest.raises(ValidationError, match="1 \\+ 4k"):
        backend.encode(video[:, :, :4])


def test_backend_reuses_its_cache_and_refuses_other_weights(tiny_vae, exported):
    d = exported["dir"]
    stamp = (d / "decode_step.onnx").stat().st_mtime_ns
    again = make_vae_backend(tiny_vae, "onnx", exported["cache"])
    again.decode(exported["latent"][:, :, :1])
    assert (d / "decode_step.onnx").stat().st_mtime_ns == stamp           # not exported again
    other = load_vae_source("recipe:tiny:99")
    with pytest.raises(CheckpointError, match="other weights"):
        OnnxVAE(d, source=other, cache_dir=exported["cache"])
    assert make_vae_backend(tiny_vae, "torch") is tiny_vae
    with pytest.raises(ValidationError, match="backend"):
        make_vae_backend(tiny_vae, "tvm", exported["cache"])


def test_changed_graph_file_is_refused(exported, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(exported["dir"], d)
    data = bytearray((d / "encode_first.onnx").read_bytes())
    data[-1] ^= 1
    (d / "encode_first.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        OnnxVAE(d)
    (d / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="manifest"):
        read_manifest(d)


def test_export_rejects_bad_requests(tiny_vae, tmp_path):
    with pytest.raises(ValidationError, match="multiples of 8"):
        export_vae(tiny_vae, tmp_path, resolution=(20, 24))
    with pytest.raises(ValidationError, match="format"):
        export_vae(tiny_vae, tmp_path, format="coreml")
    with pytest.raises(ValidationError, match="exporter"):
        export_vae(tiny_vae, tmp_path, resolution=(16, 16), parts=("decode",), exporter="jit", verify=False)


@pytest.mark.slow
def test_dynamo_exporter_matches_too(tiny_vae, tmp_path):
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [manifest] = export_vae(tiny_vae, tmp_path, resolution=(16, 16), exporter="dynamo")
    assert manifest["verified_rel_l2"]["decode_rel_l2"] <= 1e-4
    assert manifest["verified_rel_l2"]["encode_rel_l2"] <= 1e-4


@pytest.mark.slow
def test_vae_fixture_through_the_onnx_backend(tmp_path):
    from wanimate.engine.verify import vae as vae_runner

    path = FIXTURES / "vae.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = vae_runner.run(path, load_meta(path), vae_backend="onnx", vae_cache_dir=tmp_path)
    assert len(checks) == 5
    for c in checks:
        assert c.passed and c.rel_l2 <= 1e-4, c


# ------------------------------------------------------------------------------ external data

def _model(graph):
    # IR 9 (onnx 1.15): newer onnx packages write an IR version that older ONNX Runtimes refuse.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _external_model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = _model(graph)
    onnx.save_model(model, str(d / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    return d / "m.onnx"


def _relocate(path: Path, location: str, **extra) -> None:
    model = onnx.load(str(path), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    for e in entries:
        if e.key == "location":
            e.value = location
    for k, v in extra.items():
        entries.add(key=k, value=str(v))
    onnx.save_model(model, str(path))


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _external_model(tmp_path / "ok")
    assert check_external_data(path) == [(tmp_path / "ok" / "w.bin").resolve()]
    assert numpy_helper.to_array(load_onnx(path).graph.initializer[0]).sum() == 66
    y = open_session(path).run(None, {"x": np.ones((2, 3), np.float32)})[0]
    assert y.tolist() == [[12, 15, 18, 21]] * 2


@pytest.mark.parametrize("location, message", [
    ("../w.bin", "'..'"), ("sub/../../w.bin", "'..'"), ("/etc/passwd", "absolute"),
    ("..\\w.bin", "backslash"), ("C:/w.bin", "absolute"), ("missing.bin", "not a regular file"),
])
def test_external_data_outside_the_folder_is_refused(tmp_path, location, message):
    path = _external_model(tmp_path / "m")
    (tmp_path / "w.bin").write_bytes((tmp_path / "m" / "w.bin").read_bytes())
    _relocate(path, location)
    with pytest.raises(CheckpointError, match=message):
        check_external_data(path)
    with pytest.raises(CheckpointError):
        open_session(path)


def test_symlinked_external_data_is_refused(tmp_path):
    path = _external_model(tmp_path / "m")
    os.rename(tmp_path / "m" / "w.bin", tmp_path / "m" / "real.bin")
    os.symlink("real.bin", tmp_path / "m" / "w.bin")                       # even one inside the folder
    with pytest.raises(CheckpointError, match="symlink"):
        load_onnx(path)
    os.unlink(tmp_path / "m" / "w.bin")
    os.mkdir(tmp_path / "outside")
    os.rename(tmp_path / "m" / "real.bin", tmp_path / "outside" / "w.bin")
    os.symlink(tmp_path / "outside", tmp_path / "m" / "sub")               # a symlinked folder
    _relocate(path, "sub/w.bin")
    with pytest.raises(CheckpointError, match="symlink"):
        check_external_data(path)


def test_external_data_offsets_must_fit_the_file(tmp_path):
    path = _external_model(tmp_path / "m")
    _relocate(path, "w.bin", offset=40)
    with pytest.raises(CheckpointError, match="outside the"):
        check_external_data(path)


# ------------------------------------------------------------------------------ dynamic batch

def _detector(squeeze_batch: bool = False):
    """[1,3,640,640] -> [1,300,6] like YOLOv10m: strided conv, flatten (a Reshape with the batch
    baked in), top-300 by score, gather. `squeeze_batch` drops the batch axis on the way (as
    some exports do), which no surgery on the Reshape shapes can undo."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 32, 32)).astype(np.float32) * 0.05, "conv_w"),
             numpy_helper.from_array(np.array([1, 8, 400], np.int64), "flat_shape"),
             numpy_helper.from_array(np.array([1, 300, 1], np.int64), "idx_shape"),
             numpy_helper.from_array(np.array([1, 1, 8], np.int64), "expand"),
             numpy_helper.from_array(np.array([300, 8], np.int64), "rows"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([300], np.int64), "k"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([6], np.int64), "s6"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    nodes = [helper.make_node("Conv", ["images", "conv_w"], ["feat"], strides=[32, 32]),       # [1,8,20,20]
             helper.make_node("Reshape", ["feat", "flat_shape"], ["flat"]),                    # [1,8,400]
             helper.make_node("Transpose", ["flat"], ["boxes"], perm=[0, 2, 1]),               # [1,400,8]
             helper.make_node("ReduceMax", ["boxes"], ["score"], axes=[2], keepdims=0),        # [1,400]
             helper.make_node("TopK", ["score", "k"], ["top", "idx"], axis=1),                 # [1,300]
             helper.make_node("Reshape", ["idx", "idx_shape"], ["idx3"]),                      # [1,300,1]
             helper.make_node("Expand", ["idx3", "expand"], ["idx8"]),                         # [1,300,8]
             helper.make_node("GatherElements", ["boxes", "idx8"], ["picked"], axis=1),        # [1,300,8]
             helper.make_node("Slice", ["picked", "s0", "s6", "ax2"], ["output0"])]            # [1,300,6]
    if squeeze_batch:
        nodes[-1:] = [helper.make_node("Reshape", ["picked", "rows"], ["p2"]),                 # [300,8]
                      helper.make_node("Slice", ["p2", "s0", "s6", "ax2"], ["p3"]),
                      helper.make_node("Unsqueeze", ["p3", "ax0"], ["output0"])]               # [1,300,6]
        inits[-1] = numpy_helper.from_array(np.array([1], np.int64), "ax2")
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])], inits)
    return _model(graph)


def _pose():
    """[1,3,256,192] -> [1,133,64,48] like ViTPose-H: patchify conv, a flatten/softmax/unflatten head."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((133, 3, 4, 4)).astype(np.float32) * 0.1, "w"),
             numpy_helper.from_array(np.array([1, 133, 3072], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, 133, 64, 48], np.int64), "unflat")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["h"], strides=[4, 4]),
             helper.make_node("Reshape", ["h", "flat"], ["h2"]),
             helper.make_node("Softmax", ["h2"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "unflat"], ["heatmaps"])]
    graph = helper.make_graph(nodes, "pose", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 192])],
                              [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [1, 133, 64, 48])], inits)
    return _model(graph)


def _batch_dims(model):
    return ([v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input],
            [v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.output])


@pytest.mark.parametrize("build, out_shape", [(_detector, (3, 300, 6)), (_pose, (3, 133, 64, 48))])
def test_make_batch_dynamic_batches_like_single_runs(build, out_shape):
    import onnxruntime as ort

    fixed = build()
    dyn = make_batch_dynamic(fixed)                  # verifies batch-3 == 3 single runs itself
    assert _batch_dims(dyn) == (["batch"], ["batch"])
    onnx.checker.check_model(dyn, full_check=True)
    sess = ort.InferenceSession(dyn.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((3, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert y.shape == out_shape
    np.testing.assert_allclose(y[2:], ref.run(None, {sess.get_inputs()[0].name: x[2:]})[0], rtol=1e-5, atol=1e-6)
    # The fixed model refuses a batch, so the surgery is what made the difference.
    with pytest.raises(Exception):
        ref.run(None, {sess.get_inputs()[0].name: x})
    assert make_batch_dynamic(dyn, verify=False) == dyn                   # already dynamic: unchanged


def test_make_batch_dynamic_refuses_a_graph_that_bakes_in_the_batch():
    with pytest.raises(CheckpointError, match="re-export"):
        make_batch_dynamic(_detector(squeeze_batch=True))


def test_export_pose_writes_dynamic_models(tmp_path):
    onnx.save_model(_detector(), str(tmp_path / "yolov10m.onnx"))
    onnx.save_model(_pose(), str(tmp_path / "vitpose.onnx"))
    out = export_pose(tmp_path / "yolov10m.onnx", tmp_path / "vitpose.onnx", tmp_path / "out")
    for name in ("det", "pose"):
        model = onnx.load(out[name]["onnx"])
        assert _batch_dims(model)[0] == ["batch"]
    with pytest.raises(ValidationError, match="format"):
        export_pose(None, None, tmp_path, format="openvino")
    assert json.dumps(out)   # plain data for the CLI


@pytest.mark.slow
def test_pipeline_end_to_end_with_the_onnx_vae(tmp_path):
    """The animate e2e fixture (3 segments, encode + streamed decode + refert frames) with the
    pipeline's VAE swapped for the ONNX backend: what `wanimate run --vae-backend onnx` does.
    Minutes on a 2-core CPU."""
    from wanimate.engine.verify import e2e
    from helpers import E2E_FIXTURES

    path = E2E_FIXTURES / "animate_r1_g1.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = e2e.run(path, load_meta(path), vae_backend="onnx", vae_cache_dir=tmp_path)
    assert len(checks) > 20
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    assert list(tmp_path.glob("*/*x*/decode_step.onnx"))
