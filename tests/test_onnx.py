"""ONNX converter and onnxruntime target, against PyTorch, the numpy runtime and a third-party export.

The format is used only through its protocol (``get_format("onnx")``, ``OnnxOptions.parse``). Conversions are
cached in session fixtures (calibration on 64 crops to keep the file under ~3 minutes); tests that convert are
``slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import crop_px, eval_crops, files_under  # noqa: E402

from edge3dfa import assets, runtime  # noqa: E402
from edge3dfa.cli import main  # noqa: E402
from edge3dfa.converters import convert, get_format  # noqa: E402
from edge3dfa.converters.onnx import OnnxOptions  # noqa: E402
from edge3dfa.datasets.calibration import load_calibration  # noqa: E402
from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.manifest import Manifest, manifest_path  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402
from edge3dfa.target import open_target  # noqa: E402
from edge3dfa.targets.onnxruntime import OnnxTarget  # noqa: E402
from edge3dfa.targets.torch import TorchTarget  # noqa: E402

CALIB = 64
THREADS = 2
FORMAT = get_format("onnx")


def write(source: Checkpoint, dest: Path, precision: str, calibration=None, **options) -> dict:  # noqa: ANN001
    """One artifact through the protocol, as ``convert`` writes it (without parity or manifest)."""
    return FORMAT.write(source, dest, precision, OnnxOptions.parse(options), calibration)


@pytest.fixture(scope="session")
def mb05(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("onnx_out")
    arts = convert("mb05", to="onnx", precision=["fp32", "int8", "dyn-int8"], out_dir=out, calibration={"count": CALIB},
                   threads=THREADS, verbose=False)
    return {a.manifest.precision: a for a in arts}


@pytest.fixture(scope="session")
def mb05_landmarks(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_head")
    return convert("mb05", to="onnx", precision="fp32", out_dir=out, threads=THREADS, verbose=False,
                   options={"head": "landmarks"})[0]


@pytest.fixture(scope="session")
def faceboxes(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_fb")
    return convert("faceboxes", to="onnx", precision="fp32", out_dir=out, threads=THREADS, verbose=False)[0]


@pytest.fixture(scope="session")
def torch_mb05() -> TorchTarget:
    return TorchTarget("mb05", threads=THREADS)


# ------------------------------------------------------------------------------------------------- fp32
@pytest.mark.slow
def test_fp32_layout_and_manifest(mb05):
    art = mb05["fp32"]
    assert art.path.name == "mb05_fp32.onnx" and manifest_path(art.path).exists()
    assert sorted(p.name for p in art.path.parent.iterdir()) == sorted(
        f"mb05_{p}{s}" for p in ("fp32", "int8", "dyn-int8") for s in (".onnx", ".json"))  # no .onnx.data
    model = onnx.load(str(art.path))
    onnx.checker.check_model(model, full_check=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["params"]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded
    m = Manifest.read(manifest_path(art.path))
    assert m.check_artifact(manifest_path(art.path)) == art.path
    assert m.options["exporter"] == "torchscript" and m.options["opset"] >= 17
    assert set(m.tools) >= {"torch", "onnx", "onnxruntime"} and "onnxruntime" in m.min_runtime
    assert m.parity["aflw2000"]["param_max_abs"] <= 1e-4


@pytest.mark.slow
def test_fp32_matches_pytorch_any_batch(mb05, torch_mb05):
    x = eval_crops(100, 37)
    target = open_target(mb05["fp32"].path, threads=THREADS)
    assert isinstance(target, OnnxTarget) and target.input_shape == (3, 120, 120)
    opts = target.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (THREADS, 1)
    ref = torch_mb05.predict(x)
    got = target.predict(x)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.linalg.norm(crop_px(got) - crop_px(ref), axis=1).max() <= 0.01
    np.testing.assert_allclose(target.predict(x[:1]), ref[:1], atol=1e-4)  # batch 1 of a dynamic-batch model
    single = open_target(mb05["fp32"].path, threads=1)  # one thread runs 37 as chunks of 8 (5 of them)
    np.testing.assert_allclose(single.predict(x), ref, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name,seed", [("mb1", 1), ("mbv3_05", 2), ("resnet22", 3)])
def test_fp32_randomized_archs(tmp_path, name, seed):
    """Archs without public weights: seeded random weights and BN statistics, so BN folding is exercised."""
    from edge3dfa.models import build_model, get_spec, randomize_

    spec = get_spec(name)
    model = randomize_(build_model(name), seed).eval()
    src = Checkpoint.from_module(model, name, spec.arch, spec.widen_factor)
    dest = tmp_path / f"{name}.onnx"
    write(src, dest, "fp32")
    x = eval_crops(0, 8)
    ref = TorchTarget(threads=THREADS, model=model).predict(x)
    got = OnnxTarget(dest, threads=THREADS).predict(x)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() <= 1e-4 * scale, (np.abs(got - ref).max(), scale)


@pytest.mark.slow
def test_mbv3_fixture_fp32(tmp_path):
    src = Checkpoint.open(assets.fetch("mbv3_05_distilled"), "mbv3_05")
    dest = tmp_path / "mbv3.onnx"
    write(src, dest, "fp32")
    x = eval_crops(0, 16)
    ref = TorchTarget(threads=THREADS, model=src.load()).predict(x)
    got = OnnxTarget(dest, threads=THREADS).predict(x)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.linalg.norm(crop_px(got) - crop_px(ref), axis=1).max() <= 0.01


@pytest.mark.slow
def test_dynamo_exporter_same_params(tmp_path, mb05, torch_mb05):
    src = Checkpoint.from_module(torch_mb05.model, "mb05", "mobilenet_v1", 0.5)
    dest = tmp_path / "dyn.onnx"
    info = write(src, dest, "fp32", exporter="dynamo")
    assert info["options"]["exporter"] == "dynamo"
    assert not list(tmp_path.glob("*.data"))
    x = eval_crops(0, 8)
    assert np.abs(OnnxTarget(dest, threads=THREADS).predict(x) - torch_mb05.predict(x)).max() <= 1e-4


@pytest.mark.slow
def test_exports_are_byte_identical(tmp_path, mb05, torch_mb05):
    """Same checkpoint, same calibration -> the same bytes (session artifact vs a fresh export)."""
    src = Checkpoint.open("mb05")
    again = tmp_path / "again_fp32.onnx"
    write(src, again, "fp32")
    assert again.read_bytes() == mb05["fp32"].path.read_bytes()
    again8 = tmp_path / "again_int8.onnx"
    write(src, again8, "int8", calibration=load_calibration(None, count=CALIB))
    assert again8.read_bytes() == mb05["int8"].path.read_bytes()


@pytest.mark.slow
def test_stableview_reference_gives_same_params(mb05):
    """A third-party export of the same weights (fixed batch 1, opset 13) agrees with ours."""
    x = eval_crops(0, 8)
    theirs = OnnxTarget(assets.fetch("stableview_mb05_onnx"), threads=THREADS)
    assert theirs.fixed_batch == 1
    ours = OnnxTarget(mb05["fp32"].path, threads=THREADS)
    assert np.abs(theirs.predict(x) - ours.predict(x)).max() < 1e-4


# ------------------------------------------------------------------------------------------------- int8
@pytest.mark.slow
def test_int8_landmark_error(mb05, torch_mb05):
    m = mb05["int8"].manifest
    assert m.calibration["count"] == CALIB
    assert m.options["quant_format"] == "QDQ" and m.options["per_channel"] is True
    assert m.parity["aflw2000"]["landmark_mean_px"] <= 0.5
    assert {"aflw2000 fake-quant", "calibration fake-quant"} <= set(m.parity)
    # independently: 200 other AFLW2000-3D crops, TorchTarget vs OnnxTarget
    x = eval_crops(64, 200)
    ref, got = torch_mb05.predict(x), OnnxTarget(mb05["int8"].path, threads=THREADS).predict(x)
    px = np.linalg.norm(crop_px(got) - crop_px(ref), axis=1)
    assert px.mean() <= 0.5, px.mean()
    assert mb05["int8"].path.stat().st_size < 0.4 * mb05["fp32"].path.stat().st_size
    graph = onnx.load(str(mb05["int8"].path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20


@pytest.mark.slow
def test_fake_quant_is_the_same_graph_without_int8_kernels(mb05, torch_mb05):
    x = eval_crops(0, 16)
    fq = OnnxTarget(mb05["int8"].path, threads=THREADS, optimization="disable").predict(x)
    rt = OnnxTarget(mb05["int8"].path, threads=THREADS).predict(x)
    ref = torch_mb05.predict(x)
    assert 1e-4 < np.abs(fq - ref).max() < 1.0  # quantized: neither identical to fp32 nor broken
    assert np.abs(fq - rt).max() < 0.5


@pytest.mark.slow
def test_dynamic_int8(mb05):
    m = mb05["dyn-int8"].manifest
    assert any("slower" in n.lower() for n in m.notes)
    assert m.parity["aflw2000"]["landmark_mean_px"] < 2.0
    graph = onnx.load(str(mb05["dyn-int8"].path)).graph
    assert any(n.op_type in ("ConvInteger", "DynamicQuantizeLinear") for n in graph.node)


@pytest.mark.slow
def test_exclude_keeps_named_node_float(tmp_path, torch_mb05):
    src = Checkpoint.from_module(torch_mb05.model, "mb05", "mobilenet_v1", 0.5)
    dest = tmp_path / "ex.onnx"
    calibration = load_calibration(None, count=16)
    info = write(src, dest, "int8", calibration, exclude="/conv1/Conv")
    assert "/conv1/Conv" in info["options"]["excluded_nodes"]
    graph = onnx.load(str(dest)).graph
    inits = {i.name for i in graph.initializer}
    conv1 = next(n for n in graph.node if n.name == "/conv1/Conv")
    assert conv1.input[1] in inits and conv1.input[0] == "input"  # float weight, float input: not quantized
    with pytest.raises(Edge3dfaError, match="no node named"):
        write(src, tmp_path / "bad.onnx", "int8", calibration, exclude="/conv1/Cnv")
    assert not (tmp_path / "bad.onnx").exists()


# --------------------------------------------------------------------------------------- landmark head
@pytest.mark.slow
def test_fused_landmark_head_matches_numpy_runtime(tmp_path, mb05_landmarks, torch_mb05):
    m = mb05_landmarks.manifest
    assert m.output["name"] == "landmarks" and m.options["head"] == "landmarks"
    assert m.parity["aflw2000 landmarks"]["landmark_max_px"] <= 0.01
    x = eval_crops(300, 32)
    target = OnnxTarget(mb05_landmarks.path, threads=THREADS)
    got = target.run(x)[0]
    assert got.shape == (32, 3, 68)
    roi = np.tile(np.array([[0, 0, 120, 120]], np.float32), (32, 1))
    ref = runtime.to_image(runtime.reconstruct(runtime.denormalise(torch_mb05.predict(x))), roi)
    assert np.linalg.norm(got[:, :2] - ref[:, :2], axis=1).max() <= 0.01
    assert np.abs(got[:, 2] - ref[:, 2]).max() <= 0.01
    with pytest.raises(Edge3dfaError, match="not 62 params"):
        target.predict(x)
    assert main(["run", str(assets.fetch("emma")), "--artifact", str(mb05_landmarks.path),
                 "--out-dir", str(tmp_path)]) == 2
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------------- FaceBoxes
@pytest.mark.slow
def test_faceboxes_onnx_finds_the_same_faces(faceboxes):
    from edge3dfa.models.faceboxes import load_faceboxes, torch_forward
    from edge3dfa.runtime.detect import FaceBoxesDetector

    m = faceboxes.manifest
    assert m.output["name"] != "params" and "photo trump_hillary" in m.parity
    assert m.parity["photo trump_hillary"]["conf_max_abs"] < 1e-4
    target = OnnxTarget(faceboxes.path, threads=THREADS)
    assert target.input_shape == (3, None, None)
    img = cv2.imread(str(assets.fetch("trump_hillary")))
    ref = FaceBoxesDetector(torch_forward(load_faceboxes()))(img)
    got = FaceBoxesDetector(lambda blob: tuple(target.run(blob)))(img)
    assert len(ref) == len(got) == 2
    np.testing.assert_allclose(got[:, :4], ref[:, :4], atol=0.5)
    np.testing.assert_allclose(got[:, 4], ref[:, 4], atol=1e-4)
    small = np.zeros((1, 3, 200, 333), np.float32)  # any H, W
    assert target.run(small)[0].shape[1] == TorchTarget(arch="faceboxes").run(small)[0].shape[1]


@pytest.mark.slow
def test_cli_run_end_to_end_on_onnxruntime(tmp_path, mb05, faceboxes):
    photo = assets.fetch("trump_hillary")
    onnx_dir, torch_dir = tmp_path / "onnx", tmp_path / "torch"
    assert main(["run", str(photo), "--artifact", str(mb05["fp32"].path), "--detector", str(faceboxes.path),
                 "--threads", str(THREADS), "--out-dir", str(onnx_dir)]) == 0
    assert main(["run", str(photo), "--threads", str(THREADS), "--out-dir", str(torch_dir)]) == 0
    got = json.loads((onnx_dir / "trump_hillary.json").read_text())
    ref = json.loads((torch_dir / "trump_hillary.json").read_text())
    assert got["target"].startswith("onnxruntime:") and len(got["faces"]) == len(ref["faces"]) == 2
    for g, r in zip(got["faces"], ref["faces"]):
        assert np.abs(np.array(g["landmarks"]) - np.array(r["landmarks"])).max() < 0.05


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_unreadable_onnx_is_one_line_error(tmp_path, mb05):
    jpeg = tmp_path / "photo.onnx"
    shutil.copy(assets.fetch("emma"), jpeg)
    half = tmp_path / "half.onnx"
    data = mb05["fp32"].path.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for bad in (jpeg, half, empty):
        with pytest.raises(Edge3dfaError) as e:
            open_target(bad)
        assert bad.name in str(e.value) and "\n" not in str(e.value)
    assert main(["run", str(assets.fetch("emma")), "--artifact", str(half), "--out-dir", str(tmp_path)]) == 2


def test_options_and_combinations_are_checked_before_any_work(tmp_path):
    """Ranges and combinations a field's annotation cannot say, as one-line user errors, before anything is written."""
    for values, needle in (({"opset": 21}, "the torchscript exporter supports 17..20"),
                           ({"opset": 16, "exporter": "dynamo"}, "the dynamo exporter supports 17..21"),
                           ({"percentile": 50}, r"percentile=50.0: must be in \(50, 100\]"),
                           ({"num_quantized_bins": 2048}, "128 <= num_quantized_bins < num_bins"),
                           ({"calib_batch": 0}, "calib_batch >= 1"),
                           ({"exporter": "fx"}, "onnx option exporter='fx' is not one of torchscript, dynamo")):
        with pytest.raises(Edge3dfaError, match=needle):
            OnnxOptions.parse(values)
    assert OnnxOptions.parse({"opset": 21, "exporter": "dynamo"}).opset == 21
    assert OnnxOptions.parse({"exclude": "/b/Conv, /a/Conv,/b/Conv"}).excluded == ["/a/Conv", "/b/Conv"]
    landmarks_dynamo = OnnxOptions.parse({"head": "landmarks", "exporter": "dynamo"})
    FORMAT.check("fp32", False, landmarks_dynamo)  # a float head needs no node names
    for precision, detector, options, needle in (
            ("int8", False, landmarks_dynamo, "needs the default exporter"),
            ("dyn-int8", True, OnnxOptions.parse({"head": "landmarks"}), "not FaceBoxes"),
            ("int8", True, OnnxOptions(), "FaceBoxes int8 needs photo calibration"),
            ("fp16", False, OnnxOptions(), "does not offer precision fp16")):
        with pytest.raises(Edge3dfaError, match=needle):
            FORMAT.check(precision, detector, options)
    out = tmp_path / "out"
    with pytest.raises(Edge3dfaError, match="FaceBoxes int8"):
        convert("faceboxes", to="onnx", precision="int8", out_dir=out, verbose=False)
    with pytest.raises(Edge3dfaError, match="needs a calibration set"):
        FORMAT.write(Checkpoint.open("mb05"), out / "m.onnx", "int8", OnnxOptions(), None)
    assert files_under(tmp_path) == []


def test_bad_model_arguments(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Edge3dfaError, match="unknown"):
        Checkpoint.open(assets.fetch("mb05"), "mb7")
    with pytest.raises(Edge3dfaError):
        Checkpoint.open(assets.fetch("mb05"), "resnet22").load()  # mismatch
    with pytest.raises(Edge3dfaError, match="unknown onnx option"):
        convert("mb05", to="onnx", out_dir=out, verbose=False, options={"bogus": 1})
    with pytest.raises(Edge3dfaError, match="does not offer"):
        convert("mb05", to="onnx", precision="fp16", out_dir=out, verbose=False)
    assert main(["convert", "--checkpoint", str(assets.fetch("mb05")), "--arch", "mbv3_05", "--out", str(out)]) == 2
    assert files_under(out) == []


def test_bad_calibration_folders(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg at all")
    overlap = tmp_path / "overlap"
    overlap.mkdir()
    crops = assets.fetch("aflw2000_crops")
    for name in assets.fetch("aflw2000_crop_list").read_text().split()[:3]:
        shutil.copy(crops / name, overlap / name)
    for folder, count, msg in ((empty, 1, "no images"), (broken, 1, "unreadable"), (overlap, 3, "AFLW2000-3D"),
                               (tmp_path / "missing", 1, "not found"), (broken, 2, "more than the 1 images")):
        with pytest.raises(Edge3dfaError, match=msg):
            convert("mb05", to="onnx", precision="int8", calibration={"folder": folder, "count": count}, out_dir=out,
                    verbose=False)
        assert files_under(out) == []
    assert main(["convert", "--precision", "int8", "--calib-dir", str(overlap), "--calib-count", "3",
                 "--out", str(out)]) == 2
    assert files_under(out) == []


def test_output_path_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(Edge3dfaError):
        convert("mb05", to="onnx", out_dir=blocker, verbose=False)
    assert main(["convert", "--out", str(blocker / "sub")]) == 2
    assert blocker.read_text().startswith("a file") and files_under(tmp_path) == [blocker]
