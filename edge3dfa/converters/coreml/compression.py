"""Weight compression of an ML program: ``w8`` (int8 weights) and ``pal6`` / ``pal4`` (palettized weights).

* ``w8``: int8 symmetric weights (``linear_quantize_weights``) per output channel (iOS16), or per block of 32
  input channels with ``deployment_target=iOS18`` (mb05: 0.29 -> 0.07 px mean landmark error); fp16 compute.
* ``pal6`` / ``pal4``: 6 / 4-bit palettized weights (``palettize_weights``), uniform LUT per tensor with
  iOS18's per-channel scales (default deployment target iOS18: without them BN-folded weights lose mb05 ~10 px
  at 6 bits); coremltools' k-means needs scikit-learn (not in the coreml extra); a 1-D k-means LUT tried with
  per-channel scales measured worse than uniform (0.77 vs 0.48 px at 6 bits), so uniform it is.

The int8 precision (``int8``) uses ``compress(..., "w8")`` for its weights too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge3dfa.converters.coreml.export import at_least, convert_program, detector_notes, save
from edge3dfa.targets.mil_eval import quiet_coremltools

if TYPE_CHECKING:
    from edge3dfa.converters.coreml import CoreMLOptions
    from edge3dfa.models import Checkpoint

W8_BLOCK = 32
PALETTES = {"pal6": 6, "pal4": 4}


def compress(mlmodel: Any, kind: str, ios18: bool, keep: Iterable[str] = ()) -> Any:
    """int8 weights (per output channel; iOS18: per block of input channels) or a uniform LUT (iOS18: with
    per-channel scales, which BN-folded weights need). The weights of ops named in ``keep`` stay as they are
    (coremltools takes a const's config from the op that reads it)."""
    import coremltools.optimize as cto

    if kind == "w8":
        block = {"granularity": "per_block", "block_size": W8_BLOCK} if ios18 else {"granularity": "per_channel"}
        op = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", **block)
        fn = cto.coreml.linear_quantize_weights
    else:
        op = cto.coreml.OpPalettizerConfig(mode="uniform", nbits=PALETTES[kind], granularity="per_tensor",
                                           enable_per_channel_scale=ios18)
        fn = cto.coreml.palettize_weights
    config = cto.coreml.OptimizationConfig(global_config=op, op_name_configs=dict.fromkeys(keep))
    with quiet_coremltools():
        return fn(mlmodel, config)


def w8_info(ios18: bool) -> dict[str, Any]:
    return {"dtype": "int8", "mode": "linear_symmetric",
            "granularity": f"per_block {W8_BLOCK} input channels" if ios18 else "per_channel"}


def weight_notes(precision: str, compute: str, ios18: bool) -> list[str]:
    notes = []
    if ios18 and precision in ("w8", "int8"):
        notes.append("depthwise kernels stay fp16 under iOS18 per-block int8 (one input channel per block)")
    if precision not in ("fp32", "fp16"):
        notes.append("weights with fewer than 2048 elements (biases, small depthwise kernels) are kept in "
                     f"{compute} (coremltools' weight_threshold)")
    return notes


def write_compressed(source: Checkpoint, dest: Path, precision: str, options: CoreMLOptions) -> dict[str, Any]:
    """w8, pal6 or pal4 at ``dest`` (``options`` resolved); returns the manifest fields."""
    ios18 = at_least(options.deployment_target, "iOS18")
    mlmodel = compress(convert_program(source.load(), source.is_detector, options), precision, ios18)
    notes: list[str] = []
    if precision == "w8":
        compression = {"weights": w8_info(ios18)}
    else:
        compression = {"weights": {"palettization_bits": PALETTES[precision], "mode": "uniform",
                                   "granularity": "per_tensor", "per_channel_scale": ios18}}
        notes.append("palettization LUT is uniform between each tensor's min and max (k-means needs scikit-learn)"
                     + ("" if ios18 else "; without iOS18's per-channel scales it costs mb05 ~10 px"))
    notes += weight_notes(precision, options.compute, ios18) + detector_notes(source.is_detector)
    return save(mlmodel, dest, source, precision, options, notes, compression)
