"""3DMM side of 3DDFA_V2: de-normalise the 62 params and rebuild 68 sparse or ~38k dense vertices.

Layout of the 62 params (upstream): 12 camera [3x4 row-major: R|t, R scaled], 40 shape, 10 expression.
A model is ``u + W @ alpha`` with the bases stored xyz-interleaved ([3V] vectors), vectorised over faces.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge3dfa import assets
from edge3dfa.errors import Edge3dfaError

N_PARAMS, N_POSE, N_SHP, N_EXP = 62, 12, 40, 10


@dataclass(frozen=True)
class BFM:
    """Mean shape ``u`` [3V] and bases ``w`` [50, 3V] (40 shape rows, then 10 expression), xyz interleaved.

    The bases are stored transposed and contiguous: ``alpha @ w`` streams them once, which is what bounds
    dense reconstruction (23 MB of float32 per face).
    """

    u: np.ndarray
    w: np.ndarray
    param_mean: np.ndarray
    param_std: np.ndarray
    tri: np.ndarray | None = None  # [T,3] vertex ids, for meshes
    keypoints: np.ndarray | None = None  # [204] rows of the dense vectors that are the 68 landmarks

    @property
    def n_vertices(self) -> int:
        return self.u.shape[0] // 3


_cache: dict[str, BFM] = {}


def load_bfm68() -> BFM:
    """The V2 68-landmark bases and param mean/std (asset ``bfm68``)."""
    if "bfm68" not in _cache:
        d = np.load(assets.fetch("bfm68"))
        w = np.ascontiguousarray(np.concatenate([d["w_shp_base"], d["w_exp_base"]], axis=1).T, np.float32)
        _cache["bfm68"] = BFM(d["u_base"].reshape(-1).astype(np.float32), w, d["param_mean"].astype(np.float32),
                              d["param_std"].astype(np.float32), keypoints=d["keypoints_v2"])
    return _cache["bfm68"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain dicts/lists of numpy arrays and refuses everything else (a .pkl can carry code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: only numpy arrays may be loaded")


def load_pickled_arrays(path: str | Path):  # noqa: ANN201
    """Read an upstream .pkl (dict of arrays, or one array) without executing code from it."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise Edge3dfaError(f"{path}: not a pickle of numpy arrays ({e})") from e


def load_dense_bfm(path: str | Path) -> BFM:
    """A full BFM (upstream ``bfm_noneck_v3.pkl``, or an .npz with keys u, w_shp, w_exp[, tri]).

    The dense bases are not in the shared assets; users supply upstream's file. Mean/std come from ``bfm68``.
    A file that is not such a BFM (not an .npz or pickle of arrays, keys missing, arrays of the wrong kind or
    shape, triangles naming vertices that do not exist) is an Edge3dfaError naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise Edge3dfaError(f"dense BFM file not found: {path}" if not path.exists() else
                            f"dense BFM {path} is not a regular file")
    d = _read_bfm_file(path)
    u = _bfm_array(d, "u", path, (1, 2))
    w_shp, w_exp = (_bfm_array(d, k, path, (2,)) for k in ("w_shp", "w_exp"))
    for key, arr, cols in (("w_shp", w_shp, N_SHP), ("w_exp", w_exp, N_EXP)):
        if u.size != u.shape[0] or u.size % 3 or arr.shape[0] != u.size or arr.shape[1] < cols:
            raise Edge3dfaError(f"{path}: inconsistent BFM shapes: u {list(u.shape)} ([3V] or [3V,1]), {key} "
                                f"{list(arr.shape)} (one row per value of u, at least {cols} columns)")
    u = u.reshape(-1)
    w = np.concatenate([w_shp[:, :N_SHP], w_exp[:, :N_EXP]], 1).T
    tri = _bfm_array(d, "tri", path, (2,)) if "tri" in d else load_pickled_arrays(assets.fetch("tri"))
    tri = tri.T if tri.shape[0] == 3 else tri
    if tri.shape[1] != 3 or (tri.dtype.kind == "f" and not np.array_equal(tri, np.round(tri))) \
            or not 0 <= tri.min() <= tri.max() < len(u) // 3:
        raise Edge3dfaError(f"{path}: 'tri' must be [T,3] vertex ids below {len(u) // 3}, got {list(tri.shape)}")
    base = load_bfm68()
    return BFM(u, np.ascontiguousarray(w, np.float32), base.param_mean, base.param_std,
               tri.astype(np.int32), d.get("keypoints"))


def _read_bfm_file(path: Path) -> dict:
    """The arrays of a dense BFM file by key; an Edge3dfaError for anything else (no code runs from it)."""
    try:
        d = dict(np.load(path)) if path.suffix == ".npz" else load_pickled_arrays(path)
    except (ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:  # object arrays: ValueError
        raise Edge3dfaError(f"{path}: not a BFM file: not an .npz or pickle of numeric arrays ({e})") from e
    if not isinstance(d, dict):
        raise Edge3dfaError(f"{path}: not a BFM file: holds a {type(d).__name__}, not a dict of arrays")
    missing = {"u", "w_shp", "w_exp"} - set(d)
    if missing:
        raise Edge3dfaError(f"{path}: not a BFM file, missing {sorted(missing)}")
    return d


def _bfm_array(d: dict, key: str, path: Path, ndims: tuple[int, ...]) -> np.ndarray:
    """``d[key]`` as a float32 (or, for 'tri', its own numeric type) array with one of ``ndims`` dimensions."""
    a = d[key] if isinstance(d[key], np.ndarray) else None
    if a is None or a.dtype.kind not in "fiu" or a.ndim not in ndims or not a.size:
        what = f"a {a.ndim}-D {a.dtype} array" if a is not None else type(d[key]).__name__
        raise Edge3dfaError(f"{path}: '{key}' must be a non-empty {' or '.join(map(str, ndims))}-D numeric array, "
                            f"got {what}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise Edge3dfaError(f"{path}: '{key}' holds NaN or Inf")
    return a if key == "tri" else a.astype(np.float32, copy=False)


def check_params(params: np.ndarray) -> np.ndarray:
    p = np.asarray(params)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != N_PARAMS:
        raise Edge3dfaError(f"expected params of shape [N,{N_PARAMS}], got {list(np.shape(params))}")
    return p.astype(np.float32, copy=False)


def denormalise(params_norm: np.ndarray, bfm: BFM | None = None) -> np.ndarray:
    """Network output [N,62] -> 3DMM params: ``p * std + mean``."""
    bfm = bfm or load_bfm68()
    return check_params(params_norm) * bfm.param_std + bfm.param_mean


def split(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """De-normalised params [N,62] -> R [N,3,3] (scaled rotation), offset [N,3,1], alpha [N,50]."""
    p = check_params(params)
    cam = p[:, :N_POSE].reshape(-1, 3, 4)
    return cam[:, :, :3], cam[:, :, 3:], p[:, N_POSE:]


def reconstruct(params: np.ndarray, bfm: BFM | None = None) -> np.ndarray:
    """De-normalised params [N,62] -> vertices [N,3,V] in the 120x120 crop frame (before the y flip)."""
    bfm = bfm or load_bfm68()
    r, offset, alpha = split(params)
    shape = (bfm.u + alpha @ bfm.w).reshape(len(alpha), bfm.n_vertices, 3)  # [N,V,3]
    return np.matmul(r, shape.transpose(0, 2, 1)) + offset
