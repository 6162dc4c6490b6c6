"""Reading 3DDFA_V2 checkpoints safely, and turning them into eval-mode models.

Checkpoints come from strangers, so they are only ever read with ``weights_only=True``; every way a file can
be wrong becomes one ``Edge3dfaError`` line that names the file. torch is imported inside the functions so
that ``edge3dfa.models`` stays importable without it.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line

if TYPE_CHECKING:
    import torch

# Globals a plain tensor checkpoint may reference; anything else in a refused pickle means code.
_SAFE_MODULES = ("torch", "numpy")
_SAFE_NAMES = ("collections.OrderedDict", "_codecs.encode")


class _Stub:
    """Stands in for every class or function a refused pickle names, so nothing of it ever runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Recorder(pickle.Unpickler):
    """Unpickles with stubs only, to list the globals a pickle would call."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.names: list[str] = []

    def find_class(self, module: str, name: str) -> type:
        self.names.append(f"{module}.{name}")
        return _Stub

    def persistent_load(self, pid: Any) -> None:
        return None


def _pickled_globals(path: Path) -> list[str]:
    """Globals named by the file's pickle (the data.pkl of a torch zip, else the whole file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, EOFError):
        return []
    rec = _Recorder(data)
    try:
        rec.load()
    except Exception:  # noqa: BLE001 - a broken pickle still tells us the globals it named so far
        pass
    return rec.names


def _unsafe_global(path: Path, message: str) -> str | None:
    def safe(name: str) -> bool:
        return name in _SAFE_NAMES or name.split(".", 1)[0] in _SAFE_MODULES

    names = [n for n in _pickled_globals(path) if not safe(n)]
    if names:
        return names[0]
    if "GLOBAL" in message:  # torch's own refusal text, if our scan could not see the name
        return message.split("GLOBAL", 1)[1].split()[0]
    return None


def _torch_load(path: Path) -> Any:
    import torch

    if not path.exists():
        raise Edge3dfaError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise Edge3dfaError(f"checkpoint is not a file: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise Edge3dfaError(f"checkpoint is empty: {path}")
    try:
        with warnings.catch_warnings():  # torch warns on pickle protocols > 2 before refusing or loading
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _unsafe_global(path, str(e))
        if bad:
            msg = "refused: the file contains pickled code, only plain tensors are loaded"
            raise Edge3dfaError(f"{path}: {msg} (it calls {bad})") from None
        raise Edge3dfaError(f"{path}: not a PyTorch checkpoint (the file starts with {head!r})") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/KeyError/EOFError for bad bytes
        zipped = head.startswith(b"PK\x03\x04")
        if zipped or (head.startswith(b"\x80") and isinstance(e, (EOFError, RuntimeError))):
            raise Edge3dfaError(f"{path}: truncated or corrupted checkpoint ({one_line(e, 80)})") from None
        raise Edge3dfaError(f"{path}: not a PyTorch checkpoint (the file starts with {head!r})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint with upstream's wrapping removed.

    Accepts a raw state dict or ``{'state_dict': ...}``; strips DataParallel's ``module.``, renames
    ``fc_param.`` to ``fc.`` and drops the unused ``fc_lm.`` landmark head of the V2 MobileNet checkpoints.
    """
    import torch

    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise Edge3dfaError(f"{path}: no tensors found (the file holds a {kind}, not a state dict)")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("fc_lm."):
            continue
        if key.startswith("fc_param."):
            key = "fc." + key[len("fc_param."):]
        out[key] = value
    if not out:
        raise Edge3dfaError(f"{path}: no tensors found (keys: {one_line(list(obj)[:8], 100)})")
    return out


def infer_arch(state_dict: dict[str, torch.Tensor]) -> tuple[str, float]:
    """(arch, widen_factor) of a state dict from its key layout and channel counts."""
    keys = state_dict.keys()
    if "dw2_1.conv_dw.weight" in keys and "conv1.weight" in keys:
        return "mobilenet_v1", state_dict["conv1.weight"].shape[0] / 32
    if "features.0.0.weight" in keys and "features.1.conv.0.weight" in keys:
        from edge3dfa.models.mobilenet_v3 import mode_and_width

        mode, widen = mode_and_width({k: tuple(v.shape) for k, v in state_dict.items()})
        return f"mobilenet_v3_{mode}", widen
    if "conv_param.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "resnet22", 1.0
    if "inception1.branch1x1.conv.weight" in keys and "conv1.conv.weight" in keys:
        return "faceboxes", 1.0
    raise Edge3dfaError(
        f"cannot tell the architecture from the keys ({one_line(list(keys)[:4], 100)}); pass arch="
    )


def _spec_or_none(name: str) -> Any:
    from edge3dfa.models.registry import MODELS

    return MODELS.get(name)


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    for key, tensor in own.items():
        theirs, ours = tuple(sd[key].shape) if key in sd else None, tuple(tensor.shape)
        if theirs is not None and theirs != ours:
            raise Edge3dfaError(f"{source}: shape mismatch at {key}: checkpoint {theirs}, model {ours}")
    if missing:
        raise Edge3dfaError(f"{source}: missing key {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise Edge3dfaError(f"{source}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected in all)")
    model.load_state_dict(sd, strict=True)


def load_model(name_or_checkpoint: str | Path, arch: str | None = None) -> torch.nn.Module:
    """An eval-mode model from a zoo name (its checkpoint asset) or a checkpoint path.

    For a path, ``arch`` is a zoo name or arch name; without it the arch is inferred from the keys.
    Keys must match exactly, so a checkpoint of another model fails loudly instead of half-loading.
    """
    from edge3dfa.models.registry import build_model, get_spec

    spec = _spec_or_none(str(name_or_checkpoint)) if isinstance(name_or_checkpoint, str) else None
    if spec is not None:
        if spec.checkpoint_asset is None:
            raise Edge3dfaError(f"{spec.name} has no public weights; pass a checkpoint path")
        from edge3dfa.assets import fetch

        path = Path(fetch(spec.checkpoint_asset))
        arch = arch or spec.name
    else:
        path = Path(name_or_checkpoint)
        if not path.exists() and isinstance(name_or_checkpoint, str) and "/" not in name_or_checkpoint \
                and not path.suffix:
            get_spec(name_or_checkpoint)  # raises with the known names
    sd = read_state_dict(path)
    if arch is None:
        arch_name, widen = infer_arch(sd)
        model = build_model(arch_name, widen)
    else:
        model = build_model(arch)
    _load_strict(model, sd, str(path))
    return model.eval()


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights and realistic BatchNorm statistics, in place.

    Fresh BN layers have mean 0 / var 1 / weight 1 / bias 0, which makes BN folding and quantization look
    trivially right; randomised statistics let tests of archs without public weights catch real mistakes.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.01)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.25)
    return model


@dataclass
class Checkpoint:
    """A PyTorch checkpoint: the model being converted, and the reference every artifact of it is judged against.

    One object for what converters, validation and the torch runtime each used to describe their own way: where
    the weights are, their sha256 (what manifests record and references are matched by), which network they are
    (the zoo entry, or the arch and width read from the keys), and the module itself, loaded once on first use.
    """

    path: Path
    sha256: str
    name: str  # zoo name, else the file's stem
    arch: str
    widen_factor: float
    spec: Any = None  # the zoo's ModelSpec when opened by name
    _module: Any = field(default=None, repr=False, compare=False)
    #: ``edge3dfa.bundle.BundleOptions`` when the artifacts to build are phone bundles (``bundled``); None: params
    bundle: Any = None

    @classmethod
    def open(cls, model: str | os.PathLike = "mb05", arch: str | None = None) -> Checkpoint:
        """A zoo name (its weights from the assets), or a checkpoint file whose arch is ``arch`` (a zoo name, whose
        arch and width it takes, or an arch name, checked against the keys) or read from its keys. Every way a file
        can be wrong is one Edge3dfaError line naming it."""
        from edge3dfa.assets import fetch, sha256_file
        from edge3dfa.models.registry import MODELS, get_spec

        p = Path(model)
        spec = MODELS.get(str(model)) if not p.exists() else None
        if spec is not None:
            _check_zoo_arch(spec, arch)
            if spec.checkpoint_asset is None:
                raise Edge3dfaError(f"{spec.name} has no public weights; pass a checkpoint path "
                                    f"(e.g. --checkpoint FILE --arch {spec.name})")
            path = fetch(spec.checkpoint_asset)
            return cls(path, sha256_file(path), spec.name, spec.arch, spec.widen_factor, spec)
        if not p.exists():
            if not p.suffix and os.sep not in str(model):
                get_spec(str(model))  # an unknown zoo name: the error lists the known ones
            raise Edge3dfaError(f"checkpoint not found: {p}")
        from edge3dfa.models.registry import ARCHS

        if arch is not None and arch not in ARCHS:
            given = get_spec(arch)  # a zoo name: its arch and width
            arch_name, widen = given.arch, given.widen_factor
        else:
            arch_name, widen = infer_arch(read_state_dict(p))
            if arch is not None and arch_name != arch:
                raise Edge3dfaError(f"{p} is a {arch_name} checkpoint, not {arch}")
        return cls(p, sha256_file(p), p.stem, arch_name, widen)

    @classmethod
    def from_module(cls, module: torch.nn.Module, name: str, arch: str, widen_factor: float = 1.0) -> Checkpoint:
        """A module that exists only in memory (e.g. seeded random weights in a test), converted like a file's."""
        return cls(Path(f"{name}.in-memory"), "0" * 64, name, arch, widen_factor, _module=module.eval())

    @property
    def task(self) -> str:
        from edge3dfa.models.registry import task_of

        return task_of(self.arch)

    @property
    def is_detector(self) -> bool:
        return self.task == "detector"

    def load(self) -> torch.nn.Module:
        """The eval-mode module, strictly loaded (keys and shapes must match exactly), once."""
        if self._module is None:
            from edge3dfa.models.registry import build_model

            model = build_model(self.arch, self.widen_factor)
            _load_strict(model, read_state_dict(self.path), str(self.path))
            self._module = model.eval()
        return self._module

    def target(self, threads: int | None = None) -> Any:
        """The PyTorch reference as a Target (the runtime registered for checkpoints), on the already loaded module."""
        from edge3dfa.target import runtime_class

        return runtime_class(".pth")(self.path, threads=threads, arch=self.arch, model=self.load())

    def bundled(self, options: Any) -> Checkpoint:
        """The same checkpoint, to be converted as phone bundles with ``options`` (``bundle.BundleOptions``); the
        module is shared, not reloaded."""
        import dataclasses

        self.load()
        return dataclasses.replace(self, bundle=options)

    def bundle_module(self, layout: str = "NHWC", input_size: tuple[int, int] | None = None) -> torch.nn.Module:
        """The module a format converts for a bundle (``edge3dfa.models.bundle``): image in, named outputs out.
        ``input_size`` (H, W): a detector's fixed input size."""
        from edge3dfa.models.bundle import detector_bundle, regressor_bundle
        from edge3dfa.runtime.detect import FIXED_SIZE

        channels = self.bundle.channels if self.bundle is not None else "bgr"
        if self.is_detector:
            return detector_bundle(self.load(), *(input_size or FIXED_SIZE), channels=channels, layout=layout)
        return regressor_bundle(self.load(), channels=channels, layout=layout)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source``: where the weights came from and which they are."""
        return {"path": str(self.path), "sha256": self.sha256, "widen_factor": self.widen_factor}


def _check_zoo_arch(spec: Any, arch: str | None) -> None:
    """``--arch`` beside a zoo name must name that model or its arch: anything else was silently ignored."""
    from edge3dfa.models.registry import ARCHS, get_spec

    if arch is None or arch in (spec.name, spec.arch):
        return
    if arch not in ARCHS:
        given = get_spec(arch)  # not a zoo name either: the error lists the known ones
        if (given.arch, given.widen_factor) == (spec.arch, spec.widen_factor):
            return
    raise Edge3dfaError(f"{spec.name} is a {spec.arch} (width {spec.widen_factor:g}) model, not {arch}; "
                        "--arch is for checkpoint files")
