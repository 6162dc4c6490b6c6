"""Float flatbuffers from PyTorch with litert-torch, fp16 / dynamic-range int8 with ai-edge-quantizer, and the
manifest fields of a written artifact.

* Layout: the artifact takes NHWC (``[N,120,120,3]``). The permute to PyTorch's NCHW is folded away by the
  converter (no TRANSPOSE op in the graph); an NCHW artifact keeps a leading TRANSPOSE. The target converts
  the common NCHW call, so every target answers the same ``predict``.
* MobileNet-V3's squeeze-excite ``Linear`` layers are rewritten as the equal 1x1 convolutions on a kept-dim
  mean: the ``x * s[:, :, None, None]`` form fails litert-torch's NHWC layout pass, and the conv form leaves
  no TRANSPOSE and no FULLY_CONNECTED inside the blocks.
* Every artifact's op versions are raised to what its ops need before it is written (``opversions``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge3dfa.converters.tflite.opversions import inspect_ops, runtime_notes
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import native_output, one_line
from edge3dfa.manifest import CANONICAL_INPUT, CANONICAL_OUTPUT, tool_versions

if TYPE_CHECKING:
    from edge3dfa.converters.tflite import TFLiteOptions

#: the regressors' fixed input (H, W)
CROP_SIZE = (120, 120)
#: litert-torch writes each module's qualified name into the tensor names, so the wrappers below say which module
#: they come from: the name they had before the converter became a package, so moving code changes no artifact
NAME_SCOPE = "edge3dfa.converters.tflite"


def _conv_squeeze_excite(se: Any) -> Any:
    """The same squeeze-excite with its Linear layers as 1x1 convs on a kept-dim mean (see module docstring)."""
    import torch
    from torch import nn

    layers = []
    for layer in se.fc:
        if isinstance(layer, nn.Linear):
            conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(layer.weight[:, :, None, None])
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            layer = conv
        layers.append(layer)

    class ConvSqueezeExcite(nn.Module):
        __module__ = NAME_SCOPE

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.fc(x.mean((2, 3), keepdim=True))

    return ConvSqueezeExcite()


def replace_squeeze_excite(model: Any) -> Any:
    """A copy of ``model`` with converter-friendly squeeze-excite blocks (see module docstring)."""
    from edge3dfa.models.mobilenet_v3 import SEModule

    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SEModule):
                setattr(parent, name, _conv_squeeze_excite(child))
    return model


def channels_last_module(model: Any) -> Any:
    """A copy of ``model`` that takes NHWC input, with converter-friendly squeeze-excite blocks."""
    import torch
    from torch import nn

    model = replace_squeeze_excite(model)

    class ChannelsLast(nn.Module):
        __module__ = NAME_SCOPE

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> Any:
            return self.model(x.permute(0, 3, 1, 2))

    return ChannelsLast().eval()


def float_flatbuffer(model: Any, input_hw: tuple[int, int]) -> bytes:
    """torch model (NCHW) -> fp32 TFLite flatbuffer with a [1,H,W,3] input."""
    import torch

    with native_output():  # TensorFlow's absl / oneDNN banners on import
        import litert_torch
    litert_torch.config.show_progress = False
    sample = (torch.zeros(1, *input_hw, 3),)
    try:
        return litert_torch.convert(channels_last_module(model), sample).model_content()
    except Exception as e:  # noqa: BLE001 - export and MLIR passes raise many types; one line for the user
        raise Edge3dfaError(f"litert-torch could not convert the model: {one_line(e)}") from e


def quiet_bars() -> Any:
    """ai-edge-quantizer draws tqdm bars on stderr for every quantize call: fine on a terminal (they vanish),
    dozens of lines in a log when a search builds many variants; so they are shown only on a terminal."""
    return contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())


def quantize(content: bytes, precision: str, fc_per_channel: bool) -> tuple[bytes, list[str]]:
    """fp32 flatbuffer -> fp16 / dyn-int8 flatbuffer with ai-edge-quantizer, and its notes (int8, which needs
    calibration, is ``int8.TFLiteInt8Builder``)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ops = qtyping.TFLOperationName
    q = quantizer.Quantizer(bytearray(content))
    notes = []
    if precision == "fp16":
        q.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
        notes.append("fp16: weights stored as float16 (DEQUANTIZE at load, folded by XNNPACK); compute in fp32")
    elif precision == "dyn-int8":
        q.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8)
        if not fc_per_channel:
            q.add_dynamic_config(regex=".*", operation_name=ops.FULLY_CONNECTED, num_bits=8,
                                 granularity=qtyping.QuantGranularity.TENSORWISE)
        notes.append("dyn-int8: int8 weights (per-channel conv, per-tensor FULLY_CONNECTED unless fc_per_channel), "
                     "activations quantized at run time; depthwise convs stay float (ai-edge-quantizer has no "
                     "dynamic depthwise kernel)")
    else:
        raise ValueError(f"quantize() makes fp16 or dyn-int8, not {precision}")
    with quiet_bars():
        return bytes(q.quantize(None, enable_progress_report=False).quantized_model), notes


def _quantization(detail: dict[str, Any], rule: str) -> dict[str, Any]:
    scale, zero = detail["quantization"]
    return {"scale": float(scale), "zero_point": int(zero), "rule": rule}


def io_descriptions(content: bytes, detector: bool, hw: tuple[int, int]) -> tuple[dict, dict]:
    """The manifest's ``input`` and ``output`` for this flatbuffer (dtypes and int8 scales read from it)."""
    from ai_edge_litert.interpreter import Interpreter

    with native_output():  # LiteRT's XNNPACK banner on the first interpreter
        interp = Interpreter(model_content=content)
    i, outs = interp.get_input_details()[0], interp.get_output_details()
    if detector:
        inp = {"name": "input", "shape": ["N", *hw, 3], "layout": "NHWC", "channel_order": "BGR",
               "normalisation": "x - (104, 117, 123)", "range": [-123.0, 152.0]}
        out = {"name": "loc,conf", "shape": [["N", "P", 4], ["N", "P", 2]], "dtype": "float32",
               "layout": "FaceBoxes SSD offsets and softmax scores; fixed input size, so P is fixed"}
    else:
        inp = {**CANONICAL_INPUT, "shape": ["N", *CROP_SIZE, 3], "layout": "NHWC"}
        out = dict(CANONICAL_OUTPUT)
    inp["dtype"] = np.dtype(i["dtype"]).name
    if i["dtype"] != np.float32:
        inp["quantization"] = _quantization(i, "q = round(x / scale) + zero_point")
    if outs[0]["dtype"] != np.float32:
        out["dtype"] = np.dtype(outs[0]["dtype"]).name
        out["quantization"] = _quantization(outs[0], "x = (q - zero_point) * scale")
    return inp, out


def used_options(options: TFLiteOptions, precision: str, detector: bool) -> dict[str, Any]:
    """The options that shaped the artifact, for the manifest (those of other precisions left out)."""
    return {"io": options.io, "layout": "NHWC",
            **({"params_layer": options.params_layer_precision, "hard_swish": options.hard_swish_precision,
                "calib_method": options.calib_method,
                **({"percentile": options.percentile} if options.calib_method == "percentile" else {})}
               if precision == "int8" else {}),
            **({"input_size": list(options.detector_size)} if detector else {}),
            **({"fc_per_channel": options.fc_per_channel} if precision == "dyn-int8" else {}),
            "route": "litert-torch" + ("" if precision == "fp32" else " + ai-edge-quantizer")}


def write_artifact(content: bytes, dest: Path, precision: str, options: TFLiteOptions, detector: bool,
                   notes: list[str], seconds: float) -> dict[str, Any]:
    """Fix op versions, write ``dest`` and return the manifest fields."""
    content, info = inspect_ops(content, fix_versions=True)
    dest.write_bytes(content)
    hw = options.detector_size if detector else CROP_SIZE
    inp, out = io_descriptions(content, detector, hw)
    ops = ", ".join(f"{k} {v}" for k, v in info["ops"].items())
    notes = ["layout: NHWC input (the NCHW->NHWC permute folds into the first conv); targets transpose the "
             "canonical NCHW call", *notes, f"graph: {info['op_count']} ops ({ops}); converted in {seconds:.1f} s",
             *runtime_notes(info)]
    if detector:
        notes.append(f"detector fixed to {hw[0]}x{hw[1]}: run it through FaceBoxesDetector(input_size={hw}), "
                     "which shrinks and pads each photo to that size")
    return {
        "options": used_options(options, precision, detector), "input": inp, "output": out, "notes": notes,
        "min_runtime": {"tflite-runtime": info["min_tflite_runtime"], "ai-edge-litert": "1.0.0"},
        "tools": tool_versions("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    }
