"""PyTorch -> CoreML ML program (``.mlpackage``), with weight and activation compression, converted on Linux.

``CoreMLFormat`` (entry point ``coreml``) and its ``CoreMLOptions`` are the public API; one module per concern:

* ``export``: fp32 / fp16, the compute precision of the program (fp16 = what the GPU / Neural Engine run);
  graph capture (trace or torch.export), conversion, Xcode metadata, saving.
* ``compression``: ``w8`` (int8 weights), ``pal6`` / ``pal4`` (palettized weights).
* ``int8``: int8 weights AND activations (quantize/dequantize pairs, iOS17), calibrated on face crops with the
  numpy MIL evaluator (``Int8Builder``; the NME-budget search applies to it). Formerly called ``w8a8``.
* ``bundle``: phone bundles (``--bundle``): an ImageType in, landmarks / pose / params (or, for FaceBoxes, boxes /
  scores after NMS in the program) out, the contract in the package's metadata; fp32 and int8 (network only).

The deployment target is the lowest that has the chosen compression scheme: iOS16 / macOS13 (fp32, fp16, w8),
iOS17 / macOS14 (int8), iOS18 / macOS15 (pal6, pal4). Inputs are float32 tensors, or with ``input=image`` a BGR
image whose (x - 127.5) / 128 normalisation is folded into the model, so an app feeds a CVPixelBuffer as is.
Outputs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edge3dfa.converters.base import Format
from edge3dfa.errors import Edge3dfaError
from edge3dfa.options import Options, option

if TYPE_CHECKING:
    from edge3dfa.converters.coreml.int8 import Int8Builder
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint
    from edge3dfa.target import Target

__all__ = ["CoreMLFormat", "CoreMLOptions"]

FLOAT = ("fp32", "fp16")


@dataclass(frozen=True)
class CoreMLOptions(Options):
    """CoreML options; ``None`` means the default that follows from the precision. The int8 defaults were each
    measured on mb05 (``converters.coreml.int8``; README "Int8 within an NME budget")."""

    label = "coreml option"
    input: Literal["tensor", "image"] = option("tensor", "a float tensor, or a BGR image (normalisation inside)")
    route: Literal["trace", "export"] = option("trace", "graph capture: torch.jit.trace or torch.export")
    compute: Literal["fp16", "fp32"] | None = option(None, "compute precision of w8, pal6, pal4 (default fp16; "
                                                           "int8 computes in fp16)")
    deployment_target: Literal["iOS16", "iOS17", "iOS18"] | None = option(
        None, "minimum deployment target (default: the lowest with the precision's ops; iOS18 for pal6/pal4; "
              "iOS18 gives w8 per-block scales)")
    float_output: bool = option(True, "int8: keep the params layer float")
    float_input: bool = option(False, "int8: keep the first conv float")
    activations: Literal["asymmetric", "symmetric"] = option(
        "asymmetric", "int8 activation scale: with a zero point (the calibrated min..max on 256 codes, as ONNX and "
                      "TFLite int8) or without (max |x| on 255 codes)")
    calib_method: Literal["minmax", "percentile"] = option("percentile", "int8 activation ranges")
    percentile: float = option(99.999, "int8, calib_method=percentile: percentile of |x| kept")
    float_layers: tuple[str, ...] = option((), "int8: layers kept float, comma separated")

    def check(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise Edge3dfaError(f"coreml option percentile={self.percentile:g}: must be in (50, 100]")


class CoreMLFormat(Format):
    name = "coreml"
    suffix = ".mlpackage"
    extra = "coreml"
    precisions = ("fp32", "fp16", "w8", "pal6", "pal4", "int8")
    #: pal4 costs +3 NME on mb05 (measured, README "CoreML"), so it is opt-in
    default_precisions = ("fp32", "fp16", "w8", "pal6", "int8")
    calibrated = frozenset({"int8"})
    Options = CoreMLOptions
    #: what --nme-budget tries (workflows.budget): one configuration; float layers do the rest
    int8_candidates = {"int8": {}}
    #: phone bundles (``converters.coreml.bundle``): ImageType in, named outputs, the contract in the metadata
    bundles = True

    def check(self, precision: str, detector: bool, options: CoreMLOptions) -> None:
        from edge3dfa.converters.coreml.export import DEPLOYMENT_TARGETS, MIN_TARGET, at_least

        super().check(precision, detector, options)
        if options.compute is not None and precision in FLOAT:
            raise Edge3dfaError(f"coreml option compute is for w8, pal6 and pal4 (the compute precision of "
                                f"{precision} is {precision})")
        if precision == "int8" and options.compute == "fp32":  # its pairs after conv/add get fp16 scales
            raise Edge3dfaError("coreml int8 computes in fp16 (coremltools' activation quantization writes fp16 "
                                "scales); compute=fp32 is for w8, pal6 and pal4")
        floor = MIN_TARGET.get(precision, "iOS16")
        if options.deployment_target is not None and not at_least(options.deployment_target, floor):
            later = ", ".join(DEPLOYMENT_TARGETS[DEPLOYMENT_TARGETS.index(floor):])
            raise Edge3dfaError(f"coreml option deployment_target: {precision} needs {floor} or later ({later}), "
                                f"got {options.deployment_target}")
        if detector and options.input == "image":
            raise Edge3dfaError("input=image is for the 120x120 regressors; the detector takes a mean-subtracted "
                                "tensor")
        if detector and precision in self.calibrated:
            raise Edge3dfaError(f"coreml {precision} calibrates on face crops; convert the detector at "
                                f"{', '.join(p for p in self.precisions if p not in self.calibrated)}")

    def check_bundle(self, precision: str, detector: bool, options: CoreMLOptions) -> None:
        """Bundles: regressor fp32 and int8, detector fp32 (``converters.coreml.bundle``); the input is always an
        image, so ``input=tensor`` does not apply."""
        from edge3dfa.converters.coreml.bundle import check

        check(precision, detector)
        if options.route != "trace":
            raise Edge3dfaError("coreml bundles are captured with torch.jit.trace (route=trace); route=export "
                                "does not build them")

    def write(self, source: Checkpoint, dest: Path, precision: str, options: CoreMLOptions,
              calibration: CalibrationSet | None) -> dict[str, Any]:
        from edge3dfa.converters.coreml.compression import write_compressed
        from edge3dfa.converters.coreml.export import resolve, write_float

        self.check(precision, source.is_detector, options)
        if source.bundle is not None:
            from edge3dfa.converters.coreml.bundle import write_bundle

            self.check_bundle(precision, source.is_detector, options)
            return write_bundle(source, dest, precision, options, calibration)
        if precision in self.calibrated:
            if calibration is None:
                raise Edge3dfaError(f"coreml {precision} needs a calibration set (real face crops)")
            return self.int8_builder(source, options, calibration, dest.parent).export(dest)
        resolved = resolve(precision, options)
        write = write_float if precision in FLOAT else write_compressed
        return write(source, dest, precision, resolved)

    def int8_builder(self, source: Checkpoint, options: CoreMLOptions, calibration: CalibrationSet,
                     work: Path) -> Int8Builder:
        from edge3dfa.converters.coreml.int8 import Int8Builder

        return Int8Builder(source, options, calibration, work)

    def extra_parity(self, path: Path, reference: Target, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        """Which runtime measured parity: CoreML itself (macOS) or the numpy MIL evaluator."""
        from edge3dfa.targets.coreml import coreml_runtime_available

        return {"evaluated_by": "coreml" if coreml_runtime_available() else "mil-numpy"}

    def latency_unmeasured(self) -> str | None:
        """Why --nme-budget cannot time CoreML artifacts here; None where CoreML itself runs them (macOS)."""
        from edge3dfa.targets.coreml import coreml_runtime_available

        if coreml_runtime_available():
            return None
        return ("CoreML predict needs macOS; here the numpy MIL evaluator runs the artifacts, and its speed says "
                "nothing about a device's")
