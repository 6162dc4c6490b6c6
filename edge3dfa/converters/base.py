"""The converter protocol: what a format is, how it writes one artifact, how int8 variants are built.

A format is a ``Format`` subclass in its own module (or package), registered under the ``edge3dfa.converters``
entry-point group (name = format name), exactly as runtimes register under ``edge3dfa.targets``: ``convert``,
``export`` and the NME-budget search find formats there and call only what is declared here, so adding a format
is new files plus one entry-point line (``tests/test_toy_format.py`` shows it with a format from a test package).

Every method gets typed ``Options`` (the format's ``Options`` class, parsed once from the user's dict, defaults in
the class) and never a ``**options`` bag. Heavy frameworks are imported inside the methods, so listing the
formats imports none of them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.options import Options

if TYPE_CHECKING:
    from edge3dfa.datasets.calibration import CalibrationSet
    from edge3dfa.models import Checkpoint
    from edge3dfa.target import Target

#: the manifest fields a format's ``write`` may fill (edge3dfa.manifest.Manifest)
FIELDS = ("options", "input", "output", "notes", "min_runtime", "tools", "quantization", "bundle")


class Int8Builder(ABC):
    """A float graph prepared and calibrated once, quantized as often as asked with different layers kept float.

    ``layers`` maps a layer name (named like the model's modules) to what the format excludes to keep it float;
    the NME-budget search ranks layers by what keeping each one float buys. ``export`` writes one artifact and
    returns its manifest fields, like ``Format.write``.
    """

    layers: dict[str, list[str]]

    @abstractmethod
    def export(self, dest: str | os.PathLike, keep_float: Sequence[str] = ()) -> dict[str, Any]:
        """Write the int8 artifact at ``dest`` with ``keep_float`` layers float; its manifest fields."""

    def layer_sqnr(self, quantized: Path, x: np.ndarray) -> dict[str, float]:
        """SQNR (dB) of each layer's output in ``quantized`` vs float, where the format can tell; else empty."""
        return {}


class Format(ABC):
    """One artifact format. Class attributes say what it offers; methods do the work for one artifact."""

    name: ClassVar[str]  # "onnx": the manifest's ``format`` and the entry-point name
    suffix: ClassVar[str]  # ".onnx": the artifact's file (or folder) suffix, also its runtime's entry point
    extra: ClassVar[str]  # the pip extra that installs what it needs: pip install 'edge3dfa[EXTRA]'
    precisions: ClassVar[tuple[str, ...]]
    #: what ``export`` converts unless asked (a format may keep its lossiest precisions opt-in)
    default_precisions: ClassVar[tuple[str, ...]]
    #: precisions that need calibration crops; the NME-budget search applies to these
    calibrated: ClassVar[frozenset[str]] = frozenset({"int8"})
    Options: ClassVar[type[Options]] = Options
    #: whether ``write`` builds phone bundles (``source.bundle`` set: ``Checkpoint.bundle_module`` converted, the
    #: contract in the file and in the ``bundle`` manifest field, outputs named as ``edge3dfa.bundle`` says)
    bundles: ClassVar[bool] = False
    #: --nme-budget candidates: option overrides tried in turn (the fastest within budget wins)
    int8_candidates: ClassVar[dict[str, dict[str, Any]]] = {"default": {}}

    def check(self, precision: str, detector: bool, options: Options) -> None:
        """Refuse a combination that cannot work (e.g. a detector at a calibrated precision) before any work."""
        if precision not in self.precisions:
            raise Edge3dfaError(f"{self.name} does not offer precision {precision}; it offers "
                                f"{', '.join(self.precisions)}")

    def check_bundle(self, precision: str, detector: bool, options: Options) -> None:
        """Refuse a bundle this format cannot build (``bundles`` False, or a precision it does not bundle)."""
        if not self.bundles:
            raise Edge3dfaError(f"{self.name} does not build phone bundles (--bundle)")

    @abstractmethod
    def write(self, source: Checkpoint, dest: Path, precision: str, options: Options,
              calibration: CalibrationSet | None) -> dict[str, Any]:
        """Write the artifact ``dest`` (a path inside a temp folder) and return its manifest fields (``FIELDS``)."""

    def int8_builder(self, source: Checkpoint, options: Options, calibration: CalibrationSet,
                     work: Path) -> Int8Builder | None:
        """The format's ``Int8Builder`` (None: the NME-budget search is not offered for this format)."""
        return None

    def extra_parity(self, path: Path, reference: Target, sets: dict[str, np.ndarray],
                     threads: int | None) -> dict[str, Any]:
        """Parity figures only this format has (e.g. int8 as fake-quant); merged into the manifest's ``parity``."""
        return {}

    def latency_unmeasured(self) -> str | None:
        """Why timing this format's artifacts here says nothing about a device (None: it does)."""
        return None


def formats() -> dict[str, Any]:
    """Registered formats by name (entry points of ``edge3dfa.converters``), not loaded."""
    return {ep.name: ep for ep in entry_points(group="edge3dfa.converters")}


def get_format(name: str) -> Format:
    """The format called ``name``; a one-line error when it is unknown or its extra is not installed."""
    eps = formats()
    if name not in eps:
        raise Edge3dfaError(f"unknown format {name!r}; known: {', '.join(sorted(eps)) or 'none'}")
    try:
        return eps[name].load()()
    except ImportError as e:
        raise Edge3dfaError(f"the {name} converter is not available ({e}); pip install 'edge3dfa[{name}]'") from e
