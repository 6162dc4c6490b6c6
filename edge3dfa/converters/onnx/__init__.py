"""PyTorch -> ONNX (fp32, static int8 QDQ, dynamic int8) for the regressors and FaceBoxes: the format's public face.

``OnnxFormat`` (registered under the ``edge3dfa.converters`` entry points as ``onnx``) and its typed
``OnnxOptions`` are the only public API; the work is split by concern:

- ``export``: torch -> ONNX (TorchScript exporter by default), onnxruntime's offline basic optimisation,
  metadata, the manifest fields; ``head``: the optional fused landmark head;
- ``int8``: static int8 (onnxruntime's ``quantize_static`` with our calibration reader and calibrators, bias
  correction) through ``Int8Builder``, and dynamic int8;
- ``layers``: which nodes form a layer (weighted op + the elementwise ops after it, named like the model's modules),
  which stay float, and each layer's SQNR (onnxruntime's ``qdq_loss_debug``);
- ``parity``: figures only ONNX can give (int8 as fake-quant, the fused landmark head). FaceBoxes parity is the
  common ``edge3dfa.measure.parity.detector_parity``.

Frameworks are imported inside functions only, so listing the formats imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from edge3dfa.converters.base import Format
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import temp_folder
from edge3dfa.options import Options, option
from edge3dfa.runtime.detect import FIXED_SIZE

if TYPE_CHECKING:
    from edge3dfa.converters.onnx.int8 import Int8Builder
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint
    from edge3dfa.target import Target

__all__ = ["OnnxFormat", "OnnxOptions"]

PRECISIONS = ("fp32", "int8", "dyn-int8")
OPSET = 17
#: the fixed input (H, W) of a FaceBoxes bundle (``runtime.detect.FIXED_SIZE``): a 640x480 photo as is, larger
#: photos shrunk to fit and padded
DETECTOR_BUNDLE_SIZE = FIXED_SIZE


@dataclass(frozen=True)
class OnnxOptions(Options):
    """ONNX export and int8 options. The int8 defaults were chosen by measurement (mean landmark px vs PyTorch on
    AFLW2000-3D crops, mb05 and the mbv3 fixture: ``benchmarks/int8_choices.py``, figures in README "Int8 within an
    NME budget"): percentile calibration (minmax and entropy were worse, entropy also much slower); s8 asymmetric
    activations, per-channel weights, no reduce_range; the params layer float (``float_output``);
    ``float_input`` keeps the first conv float, whose full-range input saturates onnxruntime's u8 x s8 kernels on
    x86 without VNNI (found first by the --nme-budget sensitivity search).
    """

    label = "onnx option"
    exporter: Literal["torchscript", "dynamo"] = option("torchscript", "torch.onnx exporter: torchscript (module-path "
                                                                       "node names that exclude= can name) or dynamo")
    opset: int = option(OPSET, "ONNX opset (17..20 with torchscript, 17..21 with dynamo)")
    head: Literal["params", "landmarks"] = option("params", "output: 62 params, or 68 landmarks in crop pixels "
                                                            "(fused landmark head)")
    exclude: tuple[str, ...] = option((), "int8: node names kept float, comma separated")
    calib_method: Literal["percentile", "minmax", "entropy"] = option("percentile", "int8 activation ranges")
    activations: Literal["s8", "u8"] = option("s8", "int8 activation type")
    weights: Literal["s8", "u8"] = option("s8", "int8 weight type")
    reduce_range: bool = option(False, "int8: 7-bit weights (avoids u8 x s8 saturation on x86 without VNNI)")
    per_channel: bool = option(True, "int8: per-channel weight scales")
    activation_symmetric: bool = option(False, "int8: symmetric activation ranges")
    preprocess: bool = option(True, "int8: onnxruntime's quant_pre_process first")
    float_output: bool = option(True, "int8: keep the params layer float")
    float_input: bool = option(True, "int8: keep the first conv float")
    bias_correction: bool = option(False, "int8: correct each layer's weight-rounding error (Nagel et al. 2019)")
    percentile: float = option(99.999, "int8, calib_method=percentile: the percentile kept")
    num_bins: int = option(2048, "int8: histogram bins of percentile/entropy calibration")
    num_quantized_bins: int = option(128, "int8, calib_method=entropy: quantized bins")
    calib_batch: int = option(32, "int8: calibration batch size (largest divisor of the count up to this)")

    def check(self) -> None:
        if self.calib_batch < 1 or not 128 <= self.num_quantized_bins < self.num_bins:
            raise Edge3dfaError("onnx options: calib_batch >= 1 and 128 <= num_quantized_bins < num_bins")
        top = 20 if self.exporter == "torchscript" else 21  # the TorchScript exporter stops at opset 20
        if not 17 <= self.opset <= top:
            raise Edge3dfaError(f"onnx option opset={self.opset}: the {self.exporter} exporter supports 17..{top}")
        if not 50.0 < self.percentile <= 100.0:
            raise Edge3dfaError(f"onnx option percentile={self.percentile}: must be in (50, 100]")

    @property
    def excluded(self) -> list[str]:
        """``exclude`` as sorted unique node names."""
        return sorted(set(self.exclude))

    def for_task(self, detector: bool) -> OnnxOptions:
        """The options as used for this network: FaceBoxes has two detection heads, each many small tensors,
        nothing like a params layer to keep float."""
        return self.replace(float_output=False) if detector and self.float_output else self


class OnnxFormat(Format):
    name = "onnx"
    suffix = ".onnx"
    extra = "onnx"
    precisions = PRECISIONS
    default_precisions = PRECISIONS
    Options = OnnxOptions
    bundles = True
    #: what --nme-budget tries (with the defaults' float layers); the fastest within budget wins, else the fastest
    #: gets layers kept float. Measured on x86 without VNNI (AVX2): u8 x s8 kernels saturate where inputs are dense
    #: (reduce_range, 7-bit weights, avoids it at some accuracy; u8 x u8 is exact but slow); MobileNet-V3's
    #: elementwise ops (hard-swish, SE, residual) only get fused int8 kernels with u8 activations (several times
    #: faster than s8 there, at a saturation cost that float layers can buy back; README "Int8 within an NME budget").
    int8_candidates: ClassVar[dict[str, dict[str, Any]]] = {
        "s8": {}, "u8s8": {"activations": "u8"}, "reduce_range": {"reduce_range": True},
        "u8u8": {"weights": "u8", "activations": "u8"}}

    def check(self, precision: str, detector: bool, options: OnnxOptions) -> None:
        """Combinations that cannot work are user errors."""
        super().check(precision, detector, options)
        if detector and options.head != "params":
            raise Edge3dfaError("head=landmarks is for the 3DDFA regressors, not FaceBoxes")
        if detector and precision == "int8":
            raise Edge3dfaError("FaceBoxes int8 needs photo calibration, which is not offered; use fp32 or dyn-int8")
        if precision != "fp32" and options.head == "landmarks" and options.exporter != "torchscript":
            # the head is kept float by its node names (/head/...), which only the TorchScript exporter writes
            raise Edge3dfaError("a quantized head=landmarks model needs the default exporter (torchscript)")

    def write(self, source: Checkpoint, dest: Path, precision: str, options: OnnxOptions,
              calibration: CalibrationSet | None) -> dict[str, Any]:
        """Write ``dest`` (one self-contained .onnx) and return the manifest fields this format fills."""
        from edge3dfa.converters.onnx.export import write_float
        from edge3dfa.converters.onnx.int8 import write_dynamic

        self.check(precision, source.is_detector, options)
        dest = Path(dest)
        with temp_folder(dest.parent, "onnx", dest=dest) as work:
            if precision == "int8":
                return self.int8_builder(source, options, calibration, work).export(dest)
            if precision == "dyn-int8":
                return write_dynamic(source, dest, options, work)
            return write_float(source, dest, options, work)

    def check_bundle(self, precision: str, detector: bool, options: OnnxOptions) -> None:
        """Regressor bundles at every precision (int8: the network only, pre- and post-processing stay float);
        the detector bundle at fp32 (FaceBoxes int8 is not offered, and dyn-int8 only saves file size)."""
        if detector and precision != "fp32":
            raise Edge3dfaError(f"onnx detector bundles are fp32 only (asked {precision}); use --precision fp32")
        if options.head != "params":
            raise Edge3dfaError("a bundle outputs landmarks, pose and params already: leave out head=landmarks")
        if options.exporter != "torchscript":
            raise Edge3dfaError("onnx bundles use the default exporter (torchscript): its node names keep the "
                                "pre- and post-processing float")

    def int8_builder(self, source: Checkpoint, options: OnnxOptions, calibration: CalibrationSet | None,
                     work: Path) -> Int8Builder:
        """The float graph exported, pre-processed and calibrated once in ``work``, ready to quantize."""
        from edge3dfa.converters.onnx.int8 import Int8Builder

        if calibration is None:
            raise Edge3dfaError("onnx int8 needs a calibration set")
        self.check("int8", source.is_detector, options)
        return Int8Builder(source, options, calibration, work)

    def extra_parity(self, path: Path, reference: Target, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        from edge3dfa.converters.onnx.parity import extra_parity

        return extra_parity(Path(path), reference, sets, threads)
