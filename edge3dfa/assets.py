"""Registry of every data file edge3dfa reads: name -> relative path, sha256, upstream URL.

Files are found, in this order, under ``$EDGE3DFA_ASSETS`` (a copy of the shared assets folder); under the folder
named in the environment's ``etc/edge3dfa/assets`` (one line, a path: ``make`` writes it into ``.venv`` when it
sets the environment up, so ``edge3dfa`` finds the data without the Makefile and without the variable); then in
the user cache (``$EDGE3DFA_CACHE`` or ``~/.cache/edge3dfa``). Nothing is ever downloaded at import time; a
missing file is fetched from upstream with pooch only when asked (``fetch(name, download=True)`` or
``EDGE3DFA_DOWNLOAD=1``). Every file's sha256 is checked once per process on first use, so a truncated or
altered file is caught before it yields wrong landmarks.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edge3dfa.errors import Edge3dfaError

_V2 = "https://github.com/cleardusk/3DDFA_V2/raw/1b6c67601abffc1e9f248b291708aef0e43b55ae/"
_V1 = "https://github.com/cleardusk/3DDFA/raw/3545f355bfc71e5748fa915b13932958363135d7/"
_DASL = "https://github.com/XgTu/2DASL/raw/95052f203e6d945bb6563f916cc539bba0815972/"
_SV = "https://github.com/Shubhamai/StableView/raw/dca48d9c9148cd9c228c1492a0ecf3fc1df13fe8/"
_DERIVED = "derived from upstream files (see PROVENANCE.md of the assets); not downloadable"


@dataclass(frozen=True)
class Asset:
    """One file, or one folder of files (``folder=True``: sha256 is the PROVENANCE folder digest)."""

    name: str
    path: str
    sha256: str
    url: str
    folder: bool = False


_ASSETS = [
    Asset("mb05", "upstream/3ddfa_v2/weights/mb05_120x120.pth",
          "f93ed7f1c4c0382b16d7c18480a5f67473c1917a47475a9823924f38aeb27280", _V2 + "weights/mb05_120x120.pth"),
    Asset("mbv3_05_distilled", "fixtures/mbv3_05_distilled_120x120.pth",
          "8bc9e0f3b4718661760ae0940965c113dba584d0ea906efb7a4ed1395e605013",
          "test fixture distilled from mb05 (assets fixtures/README.md); not downloadable"),
    Asset("mbv3_large_05_distilled", "fixtures/mbv3_large_05_distilled_120x120.pth",
          "a0034b5f231fc394532ea351348d0e90ff9943f8aefb2561568fa6dc2b5e25ec",
          "test fixture distilled from mb05 (assets fixtures/README.md); not downloadable"),
    Asset("faceboxes", "upstream/3ddfa_v2/FaceBoxes/weights/FaceBoxesProd.pth",
          "c0cb2b1e40710c0aa5fc32a8759b1496a0fe0a126c907ca0ffe35b4bd0709d09",
          _V2 + "FaceBoxes/weights/FaceBoxesProd.pth"),
    Asset("bfm68", "bfm/derived/tddfa_v2_bfm68.npz",
          "75d0a1a4e299409cfa1e23ae7d777bcc546d497314eda71a648ee94298095368", _DERIVED),
    Asset("u_dense", "bfm/derived/u_dense_v2_from_v1.npy",
          "0fff6290873616759e6e106ee3953d15e7df5e738e2c6c17113205a2dd5ebdef", _DERIVED),
    Asset("tri", "upstream/3ddfa_v2/configs/tri.pkl",
          "0562a594d8369f7d1c86306522ff76fd3a2c81cf90ba9443893c1191ad0abbb8", _V2 + "configs/tri.pkl"),
    Asset("indices", "upstream/3ddfa_v2/configs/indices.npy",
          "b341debcdf26492332c1f96ced438e727e74164d1524cab9cca0aedf6ccd39c8", _V2 + "configs/indices.npy"),
    Asset("param_mean_std_pkl", "upstream/3ddfa_v2/configs/param_mean_std_62d_120x120.pkl",
          "090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
          _V2 + "configs/param_mean_std_62d_120x120.pkl"),
    Asset("keypoints_sim", "upstream/3ddfa_v1/train.configs/keypoints_sim.npy",
          "065053f041b03ed32e36641d26fcd9aefef36f6c518899091cdc6038a6246c13",
          _V1 + "train.configs/keypoints_sim.npy"),
    Asset("stableview_mb05_onnx", "reference/stableview_mb05_120x120.onnx",
          "4b0546e2fd13567917956efa8658b6d71fcae0f9c127fbbeb66c64bd341a9c6a", _SV + "assets/model/mb05_120x120.onnx"),
    Asset("emma", "upstream/3ddfa_v2/examples/inputs/emma.jpg",
          "c85bf90c207c3ae5645dd6d47a7e7b35af9f43f2db16038e97e28b9b5cc42119", _V2 + "examples/inputs/emma.jpg"),
    Asset("JianzhuGuo", "upstream/3ddfa_v2/examples/inputs/JianzhuGuo.jpg",
          "258f2adac53c34bd2a2fa0399fbe6cf1ae93b84508fed4f7c84a646ef691df20", _V2 + "examples/inputs/JianzhuGuo.jpg"),
    Asset("trump_hillary", "upstream/3ddfa_v2/examples/inputs/trump_hillary.jpg",
          "5da6e8a9c246f3a82987f3a9f3ee0a034d798ae4215c7453337b6a82fc25a296",
          _V2 + "examples/inputs/trump_hillary.jpg"),
    Asset("aflw2000_crop_list", "eval/aflw2000_3d/AFLW2000-3D_crop.list",
          "a080efc6fbc9d8d80173816cdcc9c952f8f06957e470e39b34c2b9d787fed5c9",
          _DASL + "test_codes/test.data/AFLW2000-3D_crop.list"),
    Asset("aflw2000_roi_box", "eval/aflw2000_3d/AFLW2000-3D_crop.roi_box.npy",
          "c82153524e8339e8e15a73d3f2ba4db69a5e664b5c2e840826b4ae8668e52bd2",
          _DASL + "test_codes/test.configs/AFLW2000-3D_crop.roi_box.npy"),
    Asset("aflw2000_pts68", "eval/aflw2000_3d/AFLW2000-3D.pts68.npy",
          "4547d9368572548b2f9f3c54986c587508ffd12d82ed03f2a8710b1c8c065872",
          _DASL + "test_codes/test.configs/AFLW2000-3D.pts68.npy"),
    Asset("aflw2000_reannotated_pts68", "eval/aflw2000_3d/AFLW2000-3D-Reannotated.pts68.npy",
          "b5710c0c9e17cd7c0ee84274736e3ab3ff6a499bf220dfc6124f12a399506d2f",
          _DASL + "test_codes/test.configs/AFLW2000-3D-Reannotated.pts68.npy"),
    Asset("aflw2000_pose", "eval/aflw2000_3d/AFLW2000-3D.pose.npy",
          "901c784bc19885c9fc19971af902f1a8c5c746e9e5b959fb997895b1578d91c4",
          _DASL + "test_codes/test.configs/AFLW2000-3D.pose.npy"),
    Asset("aflw2000_crops", "eval/aflw2000_3d/crops",
          "c7dcf2846a67bc32806c185815255786fd6d9966b467dd45d2c78c1da67eab5b",
          _DASL + "test_codes/test.data/AFLW2000-3D_crop/", folder=True),
    Asset("aflw2000_original", "eval/aflw2000_3d/original",
          "26312b219e478815b52f2cb21c8f093f3951005e608c06d59aeae5a8a55ca7b1",
          _DASL + "test_codes/test.data/AFLW-2000-3D/", folder=True),
    Asset("aflw_crop_list", "eval/aflw/AFLW_GT_crop.list",
          "976f904db6f267b041c6791ab52ef6bbe9cd0be29373b1e19ba86b634ca25217",
          _DASL + "test_codes/test.data/AFLW_GT_crop.list"),
    Asset("aflw_roi_box", "eval/aflw/AFLW_GT_crop_roi_box.npy",
          "6eca0546aac6ae481a2c7dafd4df4fc33b358861ebdaf75d6de9242d496a752e",
          _DASL + "test_codes/test.configs/AFLW_GT_crop_roi_box.npy"),
    Asset("aflw_yaws", "eval/aflw/AFLW_GT_crop_yaws.npy",
          "47e78540bb939235a561a767cd9677006d6d258e21ccf1b263c9260a18e04f99",
          _DASL + "test_codes/test.configs/AFLW_GT_crop_yaws.npy"),
    Asset("aflw_pts21", "eval/aflw/AFLW_GT_pts21.npy",
          "bd248c92349074efb753e08b0bd7ecb8ae94894925892919d220d895f48ba67e",
          _DASL + "test_codes/test.configs/AFLW_GT_pts21.npy"),
    Asset("calibration_crops", "images/calibration/aflw_gt_crop_disjoint512",
          "a190be6c0fca711e0012ec5385e4b23cee73d77f3db26dce364493b2c1de8b8f",
          _DASL + "test_codes/test.data/AFLW_GT_crop/ (512 entries chosen as in PROVENANCE.md)", folder=True),
]
REGISTRY: dict[str, Asset] = {a.name: a for a in _ASSETS}
_verified: dict[Path, str] = {}


def environment_config() -> Path:
    """The file naming the assets folder for this Python environment (``<venv>/etc/edge3dfa/assets``)."""
    return Path(sys.prefix) / "etc" / "edge3dfa" / "assets"


def _configured_root() -> Path | None:
    try:
        line = environment_config().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(line).expanduser() if line else None


def roots() -> list[Path]:
    """Where files are looked for, in order: $EDGE3DFA_ASSETS, the folder named in ``environment_config()``,
    then the user cache."""
    out = []
    if os.environ.get("EDGE3DFA_ASSETS"):
        out.append(Path(os.environ["EDGE3DFA_ASSETS"]).expanduser())
    if (configured := _configured_root()) is not None:
        out.append(configured)
    cache = os.environ.get("EDGE3DFA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "edge3dfa"
    out.append(Path(cache).expanduser())
    return out


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (e.g. an overlay before it is written)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, rel_to: Path) -> str:
    """sha256 over the ``sha256sum`` lines of every file in ``folder``, in path order (paths relative to
    ``rel_to``): the folder digest of the assets' PROVENANCE.md."""
    files = sorted((p.relative_to(rel_to).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{sha256_file(p)}  {rel}\n" for rel, p in files).encode()).hexdigest()


def fetch(name: str, download: bool | None = None) -> Path:
    """Path of a verified asset; raises Edge3dfaError naming the file, where it was expected and its source."""
    if name not in REGISTRY:
        raise Edge3dfaError(f"unknown asset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    asset = REGISTRY[name]
    for root in roots():
        path = root / asset.path
        if path.exists():
            _verify(asset, path, root)
            return path
    if download is None:
        download = os.environ.get("EDGE3DFA_DOWNLOAD") == "1"
    if download and not asset.folder and asset.url.startswith("https://"):
        return _download(asset)
    raise Edge3dfaError(
        f"asset {name!r} ({asset.path}) not found under {' or '.join(str(r) for r in roots())}; "
        f"set EDGE3DFA_ASSETS to the assets folder (or write its path into {environment_config()}), "
        f"or get it from {asset.url}")


def _verify(asset: Asset, path: Path, root: Path) -> None:
    if _verified.get(path) == asset.sha256:
        return
    digest = folder_digest(path, root) if asset.folder else sha256_file(path)
    if digest != asset.sha256:
        raise Edge3dfaError(
            f"asset {asset.name!r} at {path} is altered or incomplete (sha256 {digest[:12]}…, expected "
            f"{asset.sha256[:12]}…); restore it from {asset.url}")
    _verified[path] = asset.sha256


def _download(asset: Asset) -> Path:
    try:
        import pooch
    except ImportError as e:
        raise Edge3dfaError(f"asset {asset.name!r} is missing and pooch is not installed to fetch it "
                            f"from {asset.url}") from e
    dest = roots()[-1] / asset.path
    fname = pooch.retrieve(asset.url, known_hash=f"sha256:{asset.sha256}", fname=dest.name,
                           path=dest.parent, progressbar=True)
    return Path(fname)
