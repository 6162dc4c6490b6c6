"""TFLite converter and LiteRT target, against PyTorch on AFLW2000-3D crops and end to end without torch.

Conversions are cached in session fixtures (calibration on 64 crops to keep the file near 2-3 minutes); every
test that converts is marked ``slow``.
Every expected value is recomputed here from TorchTarget, the numpy runtime or the flatbuffer itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")

from conftest import ROOT, eval_crops, landmark_error  # noqa: E402

from edge3dfa import assets, runtime  # noqa: E402
from edge3dfa.converters import convert, get_format  # noqa: E402
from edge3dfa.converters.tflite import DETECTOR_SIZE, TFLiteOptions  # noqa: E402
from edge3dfa.converters.tflite.export import quantize  # noqa: E402
from edge3dfa.converters.tflite.opversions import PI_RUNTIME, inspect_ops, version_tuple  # noqa: E402
from edge3dfa.errors import Edge3dfaError  # noqa: E402
from edge3dfa.manifest import Manifest, manifest_path  # noqa: E402
from edge3dfa.models import build_model, randomize_  # noqa: E402
from edge3dfa.models.checkpoint import Checkpoint  # noqa: E402
from edge3dfa.target import open_target  # noqa: E402
from edge3dfa.targets.tflite import TFLiteTarget, cut_short  # noqa: E402
from edge3dfa.targets.torch import TorchTarget  # noqa: E402

CALIB = 64
THREADS = 2
TFLITE = get_format("tflite")


@pytest.fixture(scope="session")
def crops() -> np.ndarray:
    return eval_crops(0, 64)


@pytest.fixture(scope="session")
def mb05_ref(crops) -> tuple[TorchTarget, np.ndarray]:
    ref = TorchTarget("mb05", threads=THREADS)
    return ref, ref.predict(crops)


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tflite_out")


@pytest.fixture(scope="session")
def mb05(out_dir) -> dict:
    arts = convert("mb05", to="tflite", precision=list(TFLITE.precisions), out_dir=out_dir,
                   calibration={"count": CALIB}, threads=THREADS, verbose=False)
    return {a.manifest.precision: a for a in arts}


@pytest.fixture(scope="session")
def mb05_int8_variants(tmp_path_factory) -> dict:
    """int8 with int8 I/O, and int8 with float I/O and the same int8 params layer: they differ only at the I/O."""
    src = Checkpoint.open("mb05")
    out = {}
    for key, opts in {"io8": {"io": "int8"}, "io_float_params8": {"io": "float", "params_layer": "int8"}}.items():
        (a,) = convert(src, to="tflite", precision="int8", out_dir=tmp_path_factory.mktemp(key),
                       calibration={"count": CALIB}, threads=THREADS, verbose=False, options=opts)
        out[key] = a
    return out


@pytest.fixture(scope="session")
def faceboxes(out_dir):
    (a,) = convert("faceboxes", to="tflite", precision="fp32", out_dir=out_dir, threads=THREADS, verbose=False)
    return a


# -------------------------------------------------------------------------------------------- accuracy
@pytest.mark.slow
def test_fp32_params_match_pytorch(mb05, mb05_ref, crops):
    ref_target, ref = mb05_ref
    cand = TFLiteTarget(mb05["fp32"].path, threads=THREADS).predict(crops)
    assert np.abs(cand - ref).max() <= 1e-4


@pytest.mark.slow
def test_fp32_mobilenet_v3_with_squeeze_excite_rewrite(tmp_path, crops):
    """Randomised MBv3 (random BN stats too): the conv-form squeeze-excite must be exact."""
    model = randomize_(build_model("mbv3_05"), seed=3).eval()
    src = Checkpoint.from_module(model, "mbv3_05_random", "mobilenet_v3_small", 0.5)
    (a,) = convert(src, to="tflite", precision="fp32", out_dir=tmp_path, threads=THREADS, verbose=False)
    ref = TorchTarget(None, threads=THREADS, model=model).predict(crops[:16])
    cand = TFLiteTarget(a.path, threads=THREADS).predict(crops[:16])
    assert np.abs(cand - ref).max() <= 1e-4
    graph = next(n for n in a.manifest.notes if n.startswith("graph"))
    assert "HARD_SWISH" in graph and "TRANSPOSE" not in graph


@pytest.mark.slow
def test_fp16_landmarks(mb05, mb05_ref, crops):
    _, ref = mb05_ref
    px = landmark_error(ref, TFLiteTarget(mb05["fp16"].path, threads=THREADS).predict(crops))
    assert px.mean() <= 0.05
    assert px.max() <= 0.25


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["dyn-int8", "int8"])
def test_int8_mean_landmark_error(mb05, mb05_ref, crops, precision):
    _, ref = mb05_ref
    px = landmark_error(ref, TFLiteTarget(mb05[precision].path, threads=THREADS).predict(crops))
    assert px.mean() <= 0.5
    assert px.max() <= 5.0


@pytest.mark.slow
def test_int8_is_integer_and_manifest_describes_it(mb05):
    m = mb05["int8"].manifest
    assert m.calibration and m.calibration["count"] == CALIB
    assert m.input["layout"] == "NHWC" and m.input["shape"] == ["N", 120, 120, 3] and m.input["dtype"] == "float32"
    _, info = inspect_ops(mb05["int8"].path.read_bytes())
    assert info["ops"]["QUANTIZE"] == 1 and info["ops"]["DEQUANTIZE"] == 1  # int8 from input to the float head
    assert info["op_versions"]["CONV_2D"] == 3 and info["op_versions"]["DEPTHWISE_CONV_2D"] == 3
    assert m.min_runtime["tflite-runtime"] == info["min_tflite_runtime"]


@pytest.mark.slow
def test_int8_io_matches_float_io(mb05_int8_variants, crops):
    io8, io_f = mb05_int8_variants["io8"], mb05_int8_variants["io_float_params8"]
    t8 = TFLiteTarget(io8.path, threads=THREADS)
    d_in, d_out = t8.interpreter.get_input_details()[0], t8.interpreter.get_output_details()[0]
    assert d_in["dtype"] == np.int8 and d_out["dtype"] == np.int8
    q = io8.manifest.input["quantization"]
    assert (q["scale"], q["zero_point"]) == pytest.approx(d_in["quantization"])
    assert io8.manifest.output["quantization"]["scale"] == pytest.approx(d_out["quantization"][0])
    a = t8.predict(crops[:32])
    b = TFLiteTarget(io_f.path, threads=THREADS).predict(crops[:32])
    step = d_out["quantization"][0]
    assert np.abs(a - b).max() <= 2 * step + 1e-6  # same int8 graph; only where (de)quantization runs differs


@pytest.mark.slow
def test_batch_equals_single(mb05, crops):
    for precision in ("fp32", "int8"):
        t = TFLiteTarget(mb05[precision].path, threads=THREADS)
        one = np.concatenate([t.predict(crops[i:i + 1]) for i in range(5)])
        batch = t.predict(crops[:5])
        again = t.predict(crops[:1])  # back to batch 1 after a resize
        np.testing.assert_allclose(batch, one, atol=1e-5)
        np.testing.assert_allclose(again, one[:1], atol=1e-5)


# ----------------------------------------------------------------------------------- pi / op versions
@pytest.mark.slow
def test_dynamic_range_fc_versions_guard_old_runtimes(mb05):
    """Per-channel dynamic-range FC needs FULLY_CONNECTED v12 (TFLite 2.17); the default stays Pi-loadable."""
    fp32 = mb05["fp32"].path.read_bytes()
    per_channel, _ = quantize(fp32, "dyn-int8", fc_per_channel=True)
    _, before = inspect_ops(per_channel)
    assert before["op_versions"]["FULLY_CONNECTED"] < 12  # what ai-edge-quantizer writes: an old runtime loads it
    assert before["required_versions"]["FULLY_CONNECTED"] == 12
    fixed, info = inspect_ops(per_channel, fix_versions=True)
    assert info["op_versions"]["FULLY_CONNECTED"] == 12 and info["min_tflite_runtime"] == "2.17.0"
    assert inspect_ops(fixed)[1]["op_versions"]["FULLY_CONNECTED"] == 12  # written into the file
    m = mb05["dyn-int8"].manifest
    assert m.options["fc_per_channel"] is False
    assert version_tuple(m.min_runtime["tflite-runtime"]) <= version_tuple(PI_RUNTIME)
    assert not any(n.startswith("WARNING") for n in m.notes)


@pytest.mark.slow
def test_manifest_warns_when_pi_runtime_cannot_load(tmp_path):
    model = randomize_(build_model("mb05"), seed=1).eval()
    src = Checkpoint.from_module(model, "mb05_random", "mobilenet_v1", 0.5)
    (a,) = convert(src, to="tflite", precision="dyn-int8", out_dir=tmp_path, threads=THREADS, verbose=False,
                   options={"fc_per_channel": True})
    assert a.manifest.min_runtime["tflite-runtime"] == "2.17.0"
    assert any(n.startswith("WARNING") and "FULLY_CONNECTED v12" in n for n in a.manifest.notes)


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.slow
def test_truncated_file_is_one_line_error(mb05, tmp_path):
    data = mb05["fp32"].path.read_bytes()
    for cut in (len(data) // 2, 64, 6):
        bad = tmp_path / f"cut{cut}.tflite"
        bad.write_bytes(data[:cut])
        with pytest.raises(Edge3dfaError) as e:
            open_target(bad, threads=1).predict(np.zeros((1, 3, 120, 120), np.float32))
        assert "\n" not in str(e.value)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(Edge3dfaError, match="not a TFLite model"):
        open_target(junk)


@pytest.mark.slow
def test_truncation_check_for_unverifying_runtimes(mb05, faceboxes):
    """tflite-runtime does not verify flatbuffers (a cut file crashes it): the target's own walk must catch cuts."""
    for path in (mb05["int8"].path, faceboxes.path):
        data = path.read_bytes()
        assert cut_short(data) is None
        for cut in (9, 64, 1000, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 16):
            assert cut_short(data[:cut]) is not None, cut


@pytest.mark.slow
def test_other_input_shape_is_one_line_error(faceboxes, crops):
    t = TFLiteTarget(faceboxes.path, threads=THREADS)
    assert t.input_shape == (3, *DETECTOR_SIZE)
    with pytest.raises(Edge3dfaError, match=r"input must be \[N,3,480,640\]"):
        t.predict(crops[:1])


@pytest.mark.slow
def test_int8_input_out_of_range_is_error(mb05_int8_variants, crops):
    t = TFLiteTarget(mb05_int8_variants["io8"].path, threads=THREADS)
    with pytest.raises(Edge3dfaError, match="outside the int8 input range"):
        t.predict(crops[:2] * 4.0)  # e.g. pixels not normalised
    t.predict(crops[:2])  # the same crops, normalised, are fine


def check(precision: str, detector: bool, **options: str) -> TFLiteOptions:
    """``options`` parsed and checked as ``convert`` does before any work; the parsed options."""
    parsed = TFLiteOptions.parse(options)
    TFLITE.check(precision, detector, parsed)
    return parsed


def test_bad_options():
    with pytest.raises(Edge3dfaError, match="io=int8 needs precision int8"):
        check("fp32", False, io="int8")
    with pytest.raises(Edge3dfaError, match="unknown tflite option"):
        check("int8", False, iO="int8")
    with pytest.raises(Edge3dfaError, match="unknown tflite option.*head"):
        check("int8", False, head="int8")  # renamed params_layer: the old name is not silently accepted
    with pytest.raises(Edge3dfaError, match="io=int8 needs params_layer=int8"):
        check("int8", False, io="int8", params_layer="float")
    with pytest.raises(Edge3dfaError, match="calibration photos"):
        check("int8", True)
    with pytest.raises(Edge3dfaError, match="input_size is for the detector"):
        check("fp32", False, input_size="480x640")
    assert check("int8", False).hard_swish_precision == "float"  # XNNPACK has no int8 hard-swish
    assert check("int8", False).params_layer_precision == "float"  # an int8 params tensor costs ~0.6 px
    full = check("int8", False, io="int8")  # full-integer graph
    assert (full.hard_swish_precision, full.params_layer_precision) == ("int8", "int8")
    assert check("fp32", True, input_size="240x320").detector_size == (240, 320)
    assert check("fp32", True).detector_size == DETECTOR_SIZE
    with pytest.raises(Edge3dfaError, match="HxW"):
        check("fp32", True, input_size="big")
    with pytest.raises(Edge3dfaError, match="too small"):
        check("fp32", True, input_size="16x16")


# ---------------------------------------------------------------------------- end to end without torch
_BLOCKED_RUN = """
import sys
for name in ("torch", "tensorflow", "onnxruntime", "coremltools", "litert_torch", "ai_edge_quantizer"):
    sys.modules[name] = None
from edge3dfa.cli import main
code = main(sys.argv[1:])
assert all(sys.modules.get(n) is None for n in ("torch", "tensorflow", "onnxruntime", "coremltools"))
sys.exit(code)
"""


@pytest.mark.slow
def test_run_end_to_end_without_torch(mb05, faceboxes, tmp_path):
    from edge3dfa.models.faceboxes import load_faceboxes, torch_forward
    from edge3dfa.runtime.detect import FaceBoxesDetector

    photo = assets.fetch("trump_hillary")
    cmd = [sys.executable, "-c", _BLOCKED_RUN, "run", "--artifact", str(mb05["fp32"].path),
           "--detector", str(faceboxes.path), "--threads", "2", "--out-dir", str(tmp_path), str(photo)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    faces = json.loads((tmp_path / f"{photo.stem}.json").read_text())["faces"]
    assert len(faces) == 2
    # Reference: PyTorch detector at the artifact's fixed size + PyTorch regressor + the numpy runtime.
    img = cv2.imread(str(photo))
    boxes = FaceBoxesDetector(torch_forward(load_faceboxes()), input_size=DETECTOR_SIZE)(img)
    rois = runtime.roi_from_box(boxes)
    ref = runtime.landmarks(TorchTarget("mb05").predict(runtime.crops_from_rois(img, rois)), rois)[:, :2]
    got = np.array([np.asarray(f["landmarks"]).T[:2] for f in faces])
    order = np.argsort([f["box"][0] for f in faces])
    assert np.abs(got[order] - ref[np.argsort(boxes[:, 0])]).max() <= 0.5


@pytest.mark.slow
def test_manifest_round_trip(mb05):
    a = mb05["fp16"]
    m = Manifest.read(manifest_path(a.path))
    assert m.check_artifact(manifest_path(a.path)) == a.path
    assert m.format == "tflite" and m.precision == "fp16"
    assert "ai-edge-quantizer" in m.tools and "litert-torch" in m.tools
