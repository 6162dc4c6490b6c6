"""Phone bundles: a uint8 face crop in, landmarks, head pose and params out; the contract every format keeps.

Why: a params artifact outputs 62 normalised 3DMM parameters, and an app developer must then re-implement in
Kotlin or Swift what ``edge3dfa.runtime`` does in numpy (normalise the crop, de-normalise the params, rebuild the
68 landmarks from the interleaved BFM bases, flip y, derive yaw/pitch/roll). Every port is a chance to be silently
wrong. A bundle does all of it inside the model, so the app's code is two lines (``ROI_MAPPING``), and the
tests can check the whole chain against the runtime.

This module is the contract, independent of any framework:

- ``regressor_contract`` / ``detector_contract``: what a bundle's input and outputs are (names, shapes, dtype,
  channel order, units); stored in the manifest's ``bundle`` field and, as far as each format allows, in the file.
- ``reference``: the executable spec. The landmarks, pose and params ``edge3dfa.runtime`` computes from a
  network's normalised params for the roi (0, 0, 120, 120). A bundle is correct when its outputs equal these.
- ``to_photo``: the roi mapping the app does (``ROI_MAPPING``), once, for the harness and the README.
- ``to_image_uint8`` / ``from_image_uint8``: the canonical float input of every ``Target`` (BGR NCHW,
  ``(x - 127.5) / 128``) and the uint8 crop a bundle takes, converted both ways exactly (the float input is the
  uint8 crop normalised; 128 and 127.5 are powers of two apart, so nothing rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edge3dfa import runtime
from edge3dfa.errors import Edge3dfaError
from edge3dfa.options import Options, option

#: the bundle's contract version: bumped when a name, shape, unit or meaning changes
CONTRACT_VERSION = 2  # 2: a detector contract says where NMS runs as a flag, nms_in_model
#: output names of a regressor bundle, in the order every format stores them
OUTPUTS = ("landmarks", "pose", "params")
#: output names of a detector bundle
DETECTOR_OUTPUTS = ("boxes", "scores")
INPUT_NAME = "image"
N_LANDMARKS = 68

#: how far a bundle's landmarks (3-D crop px) and pose (degrees), as means over the faces, may be from the spec of
#: its own params output: its post-processing is float in every precision, so this is float32 rounding (the fp32
#: spec targets of issue 17); ``validation`` makes a bundle beyond them an error row
HEAD_LANDMARK_PX, HEAD_POSE_DEG = 0.01, 0.05

#: the roi mapping left to the app, as the two lines the README and every manifest give: landmarks are in
#: 120x120 crop pixels; ``roi`` is the square (x1, y1, x2, y2) the crop was cut from in the photo
ROI_MAPPING = (
    "x_photo = x * (roi[2] - roi[0]) / 120 + roi[0];  y_photo = y * (roi[3] - roi[1]) / 120 + roi[1]",
    "z_photo = z * ((roi[2] - roi[0]) + (roi[3] - roi[1])) / 240",
)


#: what a bundle carries and under which terms: the weights, and in a regressor the BFM-derived bases (the
#: shared assets' PROVENANCE.md); said in every bundle's contract because the bases travel inside the file
LICENCE = {
    "regressor": "network weights: 3DDFA_V2 (MIT) or the checkpoint's own; the 68-point bases and param "
                 "mean/std inside the model are derived from the Basel Face Model: academic use only (BFM 2009 "
                 "licence)",
    "detector": "FaceBoxes weights as shipped with 3DDFA_V2 (MIT)",
}


@dataclass(frozen=True)
class BundleOptions(Options):
    """How a bundle takes its image: the channel order is chosen at conversion; the layout is the format's."""

    label = "bundle option"
    channels: Literal["bgr", "rgb"] = option("bgr", "channel order of the uint8 input: bgr (what edge3dfa's "
                                                    "pipeline and OpenCV give) or rgb (Android Bitmap, CVPixelBuffer)")


def regressor_contract(channels: str = "bgr", layout: str = "NHWC") -> dict[str, Any]:
    """The input and outputs of a regressor bundle; ``layout`` NHWC (a uint8 tensor) or "image" (CoreML)."""
    shape = ["N", 120, 120, 3] if layout == "NHWC" else ["N", 3, 120, 120] if layout == "NCHW" else [1, 120, 120]
    return {
        "version": CONTRACT_VERSION,
        "kind": "regressor",
        "input": {"name": INPUT_NAME, "shape": shape, "layout": layout, "dtype": "uint8",
                  "channel_order": channels.upper(),
                  "meaning": "a 120x120 face crop cut from the photo at the roi (square, see roi_mapping), "
                             "resized bilinearly; normalisation (x - 127.5) / 128 is inside the model"},
        "outputs": {
            "landmarks": {"shape": ["N", N_LANDMARKS, 3], "dtype": "float32",
                          "meaning": "68 landmarks (x, y, z) in 120x120 crop pixels, y down, z shifted so each "
                                     "face's smallest depth is 0 (edge3dfa.runtime.landmarks for roi [0,0,120,120])"},
            "pose": {"shape": ["N", 3], "dtype": "float32",
                     "meaning": "yaw, pitch, roll in degrees (edge3dfa.runtime.pose)"},
            "params": {"shape": ["N", 62], "dtype": "float32",
                       "meaning": "de-normalised 3DMM params: 12 camera (3x4, row-major), 40 shape, 10 expression"},
        },
        "roi_mapping": list(ROI_MAPPING),
        "licence": LICENCE["regressor"],
    }


def detector_contract(height: int, width: int, channels: str = "bgr", layout: str = "NHWC",
                      nms: str | None = None) -> dict[str, Any]:
    """The input and outputs of a FaceBoxes bundle at a fixed input size; ``nms`` says where NMS runs (None: in
    the app, as ``edge3dfa.runtime.detect.nms``: the outputs are then every prior's box and score)."""
    shape = [1, height, width, 3] if layout == "NHWC" else [1, height, width]
    return {
        "version": CONTRACT_VERSION,
        "kind": "detector",
        "input": {"name": INPUT_NAME, "shape": shape, "layout": layout, "dtype": "uint8",
                  "channel_order": channels.upper(),
                  "meaning": f"the photo shrunk (never enlarged) to fit {height}x{width}, padded bottom and right "
                             "with the BGR mean (104, 117, 123); boxes are in this input's pixels: divide by the "
                             "shrink factor for photo pixels"},
        "outputs": {
            "boxes": {"shape": ["K", 4], "dtype": "float32", "meaning": "x1, y1, x2, y2 in input pixels"},
            "scores": {"shape": ["K"], "dtype": "float32", "meaning": "face probability"},
        },
        "nms": nms or _app_nms(),
        "nms_in_model": nms is not None,
        "licence": LICENCE["detector"],
    }


def _app_nms() -> str:
    """The contract's ``nms`` text for a detector bundle without NMS: the runtime's rules, for the app to apply."""
    from edge3dfa.runtime import detect as d

    return (f"not in the model: keep scores > {d.CONFIDENCE_THRESHOLD:g}, the best {d.TOP_K}, greedy NMS at IoU "
            f"{d.NMS_THRESHOLD:g} (edge3dfa.runtime.detect.nms), the best {d.KEEP_TOP_K}, then scores > "
            f"{d.SCORE_THRESHOLD:g}")


#: what a contract's input may say, as this version reads it (``check``)
CHANNEL_ORDERS = ("BGR", "RGB")
LAYOUTS = ("NHWC", "NCHW", "image")  # "image": CoreML's ImageType


#: the metadata key under which every format stores the contract JSON (ONNX metadata_props, TFLite metadata,
#: CoreML user-defined metadata; ExecuTorch: the constant method ``contract``)
METADATA_KEY = "edge3dfa.bundle"


def parse_contract(text: str | bytes | None, where: str) -> dict[str, Any] | None:
    """The contract a runtime read from a file's metadata (JSON text), checked; None when the file has none (a
    params artifact). Text that is not a contract is an Edge3dfaError naming ``where``: one parser for every
    runtime, so a file is judged the same whatever reads it."""
    import json

    if text is None:
        return None
    try:
        contract = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        contract = None
    if not isinstance(contract, dict) or not isinstance(contract.get("input"), dict):
        raise Edge3dfaError(f"{where}: its {METADATA_KEY} metadata is not a bundle contract")
    return check(contract, where)


def check(contract: Any, where: str) -> dict[str, Any]:
    """``contract`` (from a file or a manifest) if this edgeDfa can feed and read it; an Edge3dfaError otherwise.

    Why: ``image_for`` and ``Target.predict_bundle`` act on the contract's channel order, layout and kind; a
    contract from a newer edge3dfa, or one edited by hand (channel order "XYZ"), was fed as BGR NHWC without a word,
    so the landmarks would be silently wrong. ``where`` names the file in the one-line message."""
    spec = contract.get("input") if isinstance(contract, dict) else None
    if not isinstance(spec, dict):
        raise Edge3dfaError(f"{where}: its bundle contract has no 'input'")
    version, kind = contract.get("version"), contract.get("kind")
    if version != CONTRACT_VERSION:
        raise Edge3dfaError(f"{where}: bundle contract version {version!r}, but this edge3dfa reads version "
                            f"{CONTRACT_VERSION}: convert it again with this edge3dfa, or update edge3dfa")
    problems = [f"{key} {spec.get(key)!r} (not {'/'.join(allowed)})" for key, allowed in
                (("channel_order", CHANNEL_ORDERS), ("layout", LAYOUTS), ("dtype", ("uint8",)))
                if spec.get(key) not in allowed]
    if kind not in ("regressor", "detector"):
        problems.insert(0, f"kind {kind!r} (not regressor/detector)")
    elif kind == "detector" and not isinstance(contract.get("nms_in_model"), bool):
        problems.append(f"nms_in_model {contract.get('nms_in_model')!r} (not true/false)")
    if problems:
        raise Edge3dfaError(f"{where}: its bundle contract says {', '.join(problems)}")
    return contract


def reference(params_norm: np.ndarray) -> dict[str, np.ndarray]:
    """The executable spec: what a regressor bundle must output for a network's normalised params [N,62].

    ``landmarks`` [N,68,3] = ``runtime.landmarks(params, roi [0,0,120,120])`` transposed; ``pose`` [N,3] =
    ``runtime.pose``; ``params`` [N,62] de-normalised.
    """
    p = runtime.denormalise(params_norm)
    crop = np.array([[0, 0, runtime.INPUT_SIZE, runtime.INPUT_SIZE]], np.float32).repeat(len(p), 0)
    pts = runtime.landmarks(params_norm, crop)
    return {"landmarks": np.ascontiguousarray(pts.transpose(0, 2, 1)), "pose": runtime.pose(p),
            "params": p.astype(np.float32)}


def to_photo(landmarks: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """A regressor bundle's ``landmarks`` [N,68,3] (120x120 crop pixels) -> photo pixels [N,68,3], for ``roi`` [N,4]
    (x1, y1, x2, y2: the square each crop was cut from): the two lines of ``ROI_MAPPING``, which the app does.
    Equal to what ``runtime.landmarks`` gives for that roi (transposed), as ``tests/test_bundle.py`` checks."""
    lm = np.asarray(landmarks, np.float64)
    r = np.asarray(roi, np.float64).reshape(-1, 4)
    if lm.ndim != 3 or lm.shape[1:] != (N_LANDMARKS, 3) or len(r) != len(lm):
        raise Edge3dfaError(f"to_photo takes landmarks [N,{N_LANDMARKS},3] and one roi per face, got "
                            f"{list(lm.shape)} and {len(r)} roi(s)")
    w, h = (r[:, 2] - r[:, 0])[:, None], (r[:, 3] - r[:, 1])[:, None]
    size = runtime.INPUT_SIZE  # 120
    x = lm[..., 0] * w / size + r[:, :1]  # ROI_MAPPING[0]
    y = lm[..., 1] * h / size + r[:, 1:2]
    z = lm[..., 2] * (w + h) / (2 * size)  # ROI_MAPPING[1]
    return np.stack([x, y, z], axis=2).astype(np.float32)


def normalised_params(params: np.ndarray) -> np.ndarray:
    """A bundle's de-normalised params back to the network's normalised output (what ``Target.predict`` gives)."""
    bfm = runtime.load_bfm68()
    return ((np.asarray(params, np.float64) - bfm.param_mean) / bfm.param_std).astype(np.float32)


def to_image_uint8(x: np.ndarray, channels: str = "bgr", layout: str = "NHWC") -> np.ndarray:
    """Canonical float input [N,3,120,120] (BGR, (x - 127.5) / 128) -> the uint8 crop a bundle takes, exactly.

    An input that is not a normalised uint8 crop (values off the 1/128 grid, or outside [-0.996, 0.996]) cannot be
    given to a bundle without changing it: an Edge3dfaError, never a silent rounding.
    """
    pixels = np.asarray(x, np.float64) * 128.0 + 127.5
    return _as_image(pixels, channels, layout, "a bundle takes uint8 crops: this input is not a normalised uint8 "
                                               "crop ((pixel - 127.5) / 128 of integer pixels 0..255)")


def blob_to_image_uint8(blob: np.ndarray, channels: str = "bgr", layout: str = "NHWC") -> np.ndarray:
    """A FaceBoxes blob [N,3,H,W] (BGR minus ``runtime.detect.MEAN_BGR``, padding 0) -> the uint8 image a detector
    bundle takes, exactly (the padding becomes the mean colour); anything else is an Edge3dfaError."""
    from edge3dfa.runtime.detect import MEAN_BGR

    pixels = np.asarray(blob, np.float64) + np.asarray(MEAN_BGR).reshape(1, 3, 1, 1)
    return _as_image(pixels, channels, layout,
                     "a detector bundle takes uint8 images: this blob is not a uint8 image minus the mean")


def image_for(contract: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The canonical float input as the uint8 image a bundle with ``contract`` takes (its channel order and layout;
    a detector's blob as ``blob_to_image_uint8``), exactly, or an Edge3dfaError."""
    spec = contract["input"]
    channels = spec.get("channel_order", "BGR").lower()
    layout = "NHWC" if spec.get("layout", "NHWC") == "NHWC" else "NCHW"
    if contract.get("kind") == "detector":
        return blob_to_image_uint8(x, channels, layout)
    return to_image_uint8(x, channels, layout)


def _as_image(pixels: np.ndarray, channels: str, layout: str, refusal: str) -> np.ndarray:
    """BGR NCHW pixel values that must be whole numbers 0..255 -> uint8 in ``channels`` order and ``layout``."""
    u = np.rint(pixels)
    if not (np.abs(pixels - u) <= 1e-3).all() or u.min(initial=0) < 0 or u.max(initial=0) > 255:
        raise Edge3dfaError(refusal)
    u = u.astype(np.uint8)
    if channels == "rgb":
        u = u[:, ::-1]
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1) if layout == "NHWC" else u)


def from_image_uint8(u: np.ndarray, channels: str = "bgr", layout: str = "NHWC") -> np.ndarray:
    """The uint8 crops a bundle takes -> the canonical float input (``to_image_uint8`` inverted)."""
    a = np.asarray(u)
    if a.dtype != np.uint8:
        raise Edge3dfaError(f"a bundle's input is uint8, got {a.dtype}")
    a = a.transpose(0, 3, 1, 2) if layout == "NHWC" else a
    if channels == "rgb":
        a = a[:, ::-1]
    return np.ascontiguousarray((a.astype(np.float32) - 127.5) / 128.0)
