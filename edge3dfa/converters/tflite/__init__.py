"""PyTorch -> TFLite (LiteRT): fp32, fp16 weights, dynamic-range int8 and full-integer int8.

Route, chosen by measurement (see the converter's report): litert-torch lowers the torch.export graph to a
float flatbuffer (``export``), and ai-edge-quantizer quantizes that flatbuffer (``export.quantize`` for fp16 and
dyn-int8, ``int8`` for calibrated int8). Neither needs TensorFlow, and torch stays at the project's pin.
litert-torch's own PT2E int8 was worse on mb05 (0.96 px mean landmark error vs 0.35) and its MobileNet-V3 graph
failed in XNNPACK, so the PT2E quantizer is not used. Every artifact's op versions are checked against TFLite's
op-version table (``opversions``), and ``min_runtime`` says which runtime it needs.

The format is used through ``TFLiteFormat`` (entry point ``tflite`` of ``edge3dfa.converters``) and its
``TFLiteOptions``; the modules below are its parts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge3dfa.converters.base import Format
from edge3dfa.errors import Edge3dfaError
from edge3dfa.options import Options, option
from edge3dfa.runtime.detect import FIXED_SIZE

if TYPE_CHECKING:
    from edge3dfa.converters.tflite.int8 import TFLiteInt8Builder
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint

__all__ = ["DETECTOR_SIZE", "TFLiteFormat", "TFLiteOptions"]

#: FaceBoxes input the artifact is fixed to (litert-torch exports static shapes): a 640x480 photo as is
DETECTOR_SIZE = FIXED_SIZE


@dataclass(frozen=True)
class TFLiteOptions(Options):
    """TFLite options; ``None`` means the default that follows from the others."""

    label = "tflite option"
    io: Literal["float", "int8"] = option("float", "int8: int8 input and output tensors (full-integer graph)")
    params_layer: Literal["float", "int8"] | None = option(None, "int8: the params layer's precision (default: "
                                                                 "float, int8 with io=int8)")
    hard_swish: Literal["float", "int8"] | None = option(None, "int8: HARD_SWISH precision (default: as io)")
    input_size: str | None = option(None, "detector only: fixed input HxW (default 480x640)")
    fc_per_channel: bool = option(False, "dyn-int8: per-channel FULLY_CONNECTED weights")
    calib_method: Literal["mse", "percentile", "minmax"] = option(
        "mse", "int8 activation ranges: the clip of least quantization error on the calibration values, a "
               "percentile of them, or their min/max")
    percentile: float = option(99.999, "int8, calib_method=percentile: the percentile kept")

    def check(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise Edge3dfaError(f"tflite option percentile={self.percentile}: must be in (50, 100]")
        if self.io == "int8" and self.params_layer == "float":
            raise Edge3dfaError("io=int8 needs params_layer=int8: a float params layer would give a float output")
        if self.input_size is not None:
            _parse_size(self.input_size)

    @property
    def params_layer_precision(self) -> str:
        return self.params_layer or ("int8" if self.io == "int8" else "float")

    @property
    def hard_swish_precision(self) -> str:
        return self.hard_swish or self.io

    @property
    def detector_size(self) -> tuple[int, int]:
        """The detector artifact's fixed input (H, W)."""
        return DETECTOR_SIZE if self.input_size is None else _parse_size(self.input_size)


def _parse_size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in re.split(r"[x,]", value))
    except ValueError:
        raise Edge3dfaError(f"tflite option input_size must be HxW (e.g. 480x640), got {value!r}") from None
    if h < 32 or w < 32:
        raise Edge3dfaError(f"tflite option input_size {h}x{w} is too small (at least 32x32)")
    return h, w


class TFLiteFormat(Format):
    name = "tflite"
    suffix = ".tflite"
    extra = "tflite"
    precisions = ("fp32", "fp16", "dyn-int8", "int8")
    default_precisions = precisions
    Options = TFLiteOptions
    #: one configuration; mixed precision (the budget search) does the rest. The activation ranges
    #: (``calib_method``) are not candidates: they change no op, so no speed, and the search picks by speed
    int8_candidates = {"int8": {}}
    #: phone bundles (``converters.tflite.bundle``): regressor fp32 and int8, detector fp32
    bundles = True

    def check(self, precision: str, detector: bool, options: TFLiteOptions) -> None:
        super().check(precision, detector, options)
        if options.io == "int8" and precision != "int8":
            raise Edge3dfaError(f"io=int8 needs precision int8 (a {precision} model computes in float)")
        if options.input_size is not None and not detector:
            raise Edge3dfaError("tflite option input_size is for the detector; regressors take 120x120")
        if detector and precision == "int8":
            raise Edge3dfaError("int8 FaceBoxes needs calibration photos, which the shared set (face crops) is "
                                "not; use fp32, fp16 or dyn-int8 for the detector")

    def check_bundle(self, precision: str, detector: bool, options: TFLiteOptions) -> None:
        if precision not in (("fp32",) if detector else ("fp32", "int8")):
            raise Edge3dfaError(f"tflite bundles are built at fp32 and int8 (detector: fp32), not {precision}: "
                                "fp16 / dyn-int8 weights would quantize the post-processing's bases too")
        if options.io != "float":
            raise Edge3dfaError("io=int8 does not apply to a bundle: its input is the uint8 image, its outputs float")

    def write(self, source: Checkpoint, dest: Path, precision: str, options: TFLiteOptions,
              calibration: CalibrationSet | None) -> dict[str, Any]:
        from edge3dfa.converters.tflite.export import CROP_SIZE, float_flatbuffer, quantize, write_artifact

        self.check(precision, source.is_detector, options)
        if source.bundle is not None:
            from edge3dfa.converters.tflite.bundle import write_bundle

            self.check_bundle(precision, source.is_detector, options)
            return write_bundle(source, dest, precision, options, calibration)
        if precision == "int8":
            return self.int8_builder(source, options, calibration, dest.parent).export(dest)
        t0 = time.perf_counter()
        content = float_flatbuffer(source.load(), options.detector_size if source.is_detector else CROP_SIZE)
        notes: list[str] = []
        if precision != "fp32":
            content, notes = quantize(content, precision, options.fc_per_channel)
        return write_artifact(content, dest, precision, options, source.is_detector, notes, time.perf_counter() - t0)

    def int8_builder(self, source: Checkpoint, options: TFLiteOptions, calibration: CalibrationSet | None,
                     work: Path | None = None) -> TFLiteInt8Builder:
        from edge3dfa.converters.tflite.int8 import TFLiteInt8Builder

        self.check("int8", source.is_detector, options)
        return TFLiteInt8Builder(source, options, calibration, work)
