"""Is a calibration image part of the evaluation set? Decoded pixels are compared, never names or bytes.

Calibrating int8 on AFLW2000-3D faces would flatter every int8 figure measured on it, and a copy need not
keep the name or the bytes: PNG re-saves, JPEG re-encodes and resized copies all count. Each calibration
image is compared with every AFLW2000-3D crop (and, when it is a photo rather than a crop, with every
AFLW2000-3D original photo) in two ways:

* exact: sha256 of the decoded pixels, which catches a copy in any lossless format;
* near: a perceptual hash (pHash: grayscale, shrunk to 32x32, 2-D DCT, the 16x16 lowest frequencies but the
  constant term, each bit = above their median: 255 bits) compared by Hamming distance, also for the
  mirrored image. Re-encoding and resizing change the fine detail this hash ignores.

``NEAR_DUPLICATE_BITS`` sits between what copies reach and how close genuinely different faces come, both
measured by ``benchmarks/overlap_check.py`` (JPEG quality 50-95, PNG re-saves, 120->240->120 and other
resizes, resized copies saved as files, for all 2000 crops and originals; against the nearest evaluation
crop of each of the 512 disjoint calibration crops and of the example photos). That script also reports what
this check cannot see: a crop pasted at an unknown place and scale into a larger photo (the detector frames
it differently and the hash does not follow shifts), and differently framed crops of the same photo, which
AFLW holds under more than one image id.

The fingerprints of the 2000 crops (and originals) are computed once and cached in the user cache, keyed by
the assets' verified digest, so a calibration check costs milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np

from edge3dfa import assets
from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import write_bytes
from edge3dfa.runtime.preprocess import read_image

HASH_SIZE, HASH_FREQS = 32, 16  # shrink to 32x32, keep the 16x16 lowest DCT frequencies (less the DC term)
HASH_BITS = HASH_FREQS * HASH_FREQS - 1
NEAR_DUPLICATE_BITS = 28  # at most this many of HASH_BITS differ: a near-duplicate (benchmarks/overlap_check.py)
CACHE_VERSION = 1
#: which evaluation images are compared: asset -> what to call one in a message
REFERENCES = {"aflw2000_crops": "AFLW2000-3D crop", "aflw2000_original": "AFLW2000-3D photo"}
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)


def image_hash(img: np.ndarray) -> np.ndarray:
    """The 255-bit pHash of a BGR or gray uint8 image, packed into 32 bytes."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    small = cv2.resize(gray, (HASH_SIZE, HASH_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    freqs = cv2.dct(small)[:HASH_FREQS, :HASH_FREQS].reshape(-1)[1:]
    return np.packbits(freqs > np.median(freqs))


def pixel_digest(img: np.ndarray) -> bytes:
    """sha256 of the decoded pixels and their shape: equal for any lossless copy of the same image."""
    return hashlib.sha256(repr(img.shape).encode() + np.ascontiguousarray(img).tobytes()).digest()


def hash_distance(h: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Hamming distances between one packed hash and [N,32] packed hashes."""
    return _POPCOUNT[np.bitwise_xor(hashes, h)].sum(axis=1)


@dataclass(frozen=True)
class Fingerprints:
    """Pixel digests and pHashes of every image of one evaluation asset."""

    what: str  # e.g. "AFLW2000-3D crop"
    names: tuple[str, ...]
    digests: dict[bytes, int]  # pixel digest -> row
    hashes: np.ndarray  # [N,32] uint8, packed 255-bit pHashes

    def match(self, img: np.ndarray, exact: bool = True) -> str | None:
        """How ``img`` (BGR uint8) copies one of these images, or None; mirrored copies count too."""
        if exact and pixel_digest(img) in self.digests:
            return f"a copy of {self.what} {self.names[self.digests[pixel_digest(img)]]} (identical pixels)"
        dist = np.minimum(hash_distance(image_hash(img), self.hashes),
                          hash_distance(image_hash(np.ascontiguousarray(img[:, ::-1])), self.hashes))
        i = int(dist.argmin())
        if dist[i] <= NEAR_DUPLICATE_BITS:
            return (f"a near-duplicate of {self.what} {self.names[i]} (a re-encoded, resized or mirrored copy: "
                    f"{dist[i]} of {HASH_BITS} hash bits differ, at most {NEAR_DUPLICATE_BITS} for copies)")
        return None


@cache
def reference(asset: str) -> Fingerprints:
    """Fingerprints of every image of ``asset`` (a folder asset in ``REFERENCES``), cached on disk."""
    folder = assets.fetch(asset)  # verifies the folder's digest, which keys the cache
    names = assets.fetch("aflw2000_crop_list").read_text().split()  # one name per face, in every folder
    cache = assets.roots()[-1] / "fingerprints" / f"{asset}-{assets.REGISTRY[asset].sha256[:16]}-v{CACHE_VERSION}.npz"
    arrays = _load_cache(cache, names)
    if arrays is None:
        images = [read_image(folder / n) for n in names]
        arrays = {"names": np.array(names), "digests": np.frombuffer(b"".join(map(pixel_digest, images)),
                                                                        np.uint8).reshape(-1, 32),
                  "hashes": np.stack([image_hash(img) for img in images])}
        _save_cache(cache, arrays)
    digests = {bytes(d): i for i, d in enumerate(arrays["digests"])}
    return Fingerprints(REFERENCES[asset], tuple(names), digests, arrays["hashes"])


def _load_cache(path: object, names: list[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("names", "digests", "hashes")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing or unreadable: computed again
    ok = (arrays["names"].tolist() == names and arrays["digests"].shape == (len(names), 32)
          and arrays["hashes"].shape == (len(names), (HASH_BITS + 7) // 8))
    return arrays if ok else None


def _save_cache(path: object, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        write_bytes(path, buf.getvalue())
    except (OSError, Edge3dfaError):
        pass  # a read-only cache only costs the time to compute the fingerprints again
