"""TFLite int8 activation ranges (``calib_method``): the range arithmetic against numpy on raw samples, and the
default (MSE) ranges against global min/max on a real model, judged on crops calibration never saw.

The expected values come from numpy on the samples themselves (np.percentile, a simulated uint8 quantizer),
not from the histograms the code under test works on.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge3dfa.converters.tflite import TFLiteOptions
from edge3dfa.errors import Edge3dfaError

pytest.importorskip("ai_edge_litert")

from edge3dfa.converters.tflite.int8 import RANGE_BINS, mse_range, percentile_range  # noqa: E402


def _counts(x: np.ndarray) -> tuple[float, float, np.ndarray]:
    lo, hi = float(x.min()), float(x.max())
    return lo, hi, np.histogram(x, RANGE_BINS, (lo, hi))[0]


def _quantization_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of x through an asymmetric 8-bit quantizer over [lo, hi] (clip, round, dequantize)."""
    step = (hi - lo) / 255
    q = np.round((np.clip(x, lo, hi) - lo) / step) * step + lo
    return float(np.mean((q - x) ** 2))


def test_percentile_range_matches_numpy():
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal(400_000), 0) ** 2  # ReLU-like: a long upper tail, many zeros
    lo, hi, counts = _counts(relu)
    low, up = percentile_range(lo, hi, counts, 99.9)
    assert low == 0.0  # a non-negative tensor keeps its 0
    bin_width = (hi - lo) / RANGE_BINS
    assert np.percentile(relu, 99.9) <= up <= np.percentile(relu, 99.9) + 2 * bin_width
    assert up < 0.5 * hi  # the tail really is cut

    signed = rng.standard_t(3, 400_000)  # both tails heavy
    lo, hi, counts = _counts(signed)
    low, up = percentile_range(lo, hi, counts, 99.9)
    bin_width = (hi - lo) / RANGE_BINS
    assert np.percentile(signed, 0.1) - 2 * bin_width <= low <= np.percentile(signed, 0.1)
    assert np.percentile(signed, 99.9) <= up <= np.percentile(signed, 99.9) + 2 * bin_width
    assert percentile_range(lo, hi, counts, 100.0) == pytest.approx((lo, hi))  # 100: the min/max itself


def test_mse_range_lowers_the_simulated_quantization_error():
    rng = np.random.default_rng(1)
    outliers = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]])  # two values stretch the range 5x
    lo, hi, counts = _counts(outliers)
    low, up = mse_range(lo, hi, counts)
    best = min(_quantization_mse(outliers, a * lo, a * hi) for a in np.linspace(0.05, 1.0, 96))  # brute force
    assert _quantization_mse(outliers, low, up) <= 1.05 * best
    assert _quantization_mse(outliers, low, up) < 0.8 * _quantization_mse(outliers, lo, hi)
    uniform = rng.uniform(-1, 3, 200_000)  # nothing to clip: clipping would only add error
    lo, hi, counts = _counts(uniform)
    low, up = mse_range(lo, hi, counts)
    assert _quantization_mse(uniform, low, up) <= 1.05 * _quantization_mse(uniform, lo, hi)
    assert up - low > 0.95 * (hi - lo)


def test_bad_percentile():
    for bad in ("50", "100.5", "-1"):
        with pytest.raises(Edge3dfaError, match="percentile"):
            TFLiteOptions.parse({"percentile": bad})
    with pytest.raises(Edge3dfaError, match="calib_method"):
        TFLiteOptions.parse({"calib_method": "entropy"})
    assert TFLiteOptions.parse({}).calib_method == "mse"


@pytest.mark.slow
def test_clipped_ranges_bring_int8_closer_to_fp32(tmp_path):
    """mb05, calibrated on 64 pool crops: the default (MSE) and percentile ranges each give a smaller landmark
    error against PyTorch than global min/max on 64 AFLW2000-3D crops (never calibrated on); the manifest says
    which ranges were used."""
    pytest.importorskip("litert_torch")
    from conftest import eval_crops, landmark_error

    from edge3dfa.converters import get_format
    from edge3dfa.converters.tflite.int8 import clip_ranges
    from edge3dfa.datasets.calibration import load_calibration
    from edge3dfa.models.checkpoint import Checkpoint
    from edge3dfa.target import open_target
    from edge3dfa.targets.torch import TorchTarget

    fmt = get_format("tflite")
    src = Checkpoint.open("mb05")
    calib = load_calibration(None, count=64).data
    minmax = fmt.Options.parse({"calib_method": "minmax"})
    builder = fmt.int8_builder(src, minmax, calib, tmp_path)  # one conversion, two sets of ranges
    assert builder.export(tmp_path / "minmax.tflite")["options"]["calib_method"] == "minmax"
    raw = builder.qsvs
    for name, values in {"mse": {}, "percentile": {"calib_method": "percentile"}}.items():
        builder.options = fmt.Options.parse(values)
        builder.qsvs = clip_ranges(builder.content, raw, calib, builder.options)
        fields = builder.export(tmp_path / f"{name}.tflite")
        assert fields["options"]["calib_method"] == name
        assert fields["options"].get("percentile") == (99.999 if name == "percentile" else None)

    crops = eval_crops(0, 64)
    ref = TorchTarget("mb05", threads=2).predict(crops)
    err = {name: landmark_error(ref, open_target(tmp_path / f"{name}.tflite", threads=2).predict(crops)).mean()
           for name in ("minmax", "mse", "percentile")}
    assert err["mse"] < err["minmax"] and err["percentile"] < err["minmax"], err
