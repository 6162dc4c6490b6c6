"""Mesh files (.ply binary little-endian, .obj text) of the dense 3D face, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge3dfa.errors import Edge3dfaError
from edge3dfa.fileio import write_bytes

#: mesh file formats, by suffix
MESH_FORMATS = ("ply", "obj")


def _check(vertices: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vertices, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != 3:
        raise Edge3dfaError(f"vertices must be [3,V] (the runtime's layout), got {list(v.shape)}")
    v = v.T
    t = np.asarray(tri, dtype=np.int32)
    t = t if t.ndim == 2 and t.shape[1] == 3 else t.T  # [T,3], or upstream's [3,T]
    if t.size and (t.min() < 0 or t.max() >= len(v)):
        raise Edge3dfaError(f"triangle ids out of range for {len(v)} vertices")
    return np.ascontiguousarray(v), np.ascontiguousarray(t)


def write_mesh(path: str | Path, vertices: np.ndarray, tri: np.ndarray) -> Path:
    """The mesh in the format its suffix names (``MESH_FORMATS``): vertices [3,V] float32, triangles [T,3]
    (or upstream's [3,T]) int32."""
    return write_bytes(path, mesh_bytes(vertices, tri, Path(path).suffix.lstrip(".").lower()))


def mesh_bytes(vertices: np.ndarray, tri: np.ndarray, kind: str) -> bytes:
    """The bytes of a mesh file of format ``kind`` (one of ``MESH_FORMATS``)."""
    if kind not in MESH_FORMATS:
        raise Edge3dfaError(f"unknown mesh format {kind!r}; known: {', '.join(MESH_FORMATS)}")
    return (ply_bytes if kind == "ply" else obj_bytes)(vertices, tri)


def ply_bytes(vertices: np.ndarray, tri: np.ndarray) -> bytes:
    """Binary little-endian PLY."""
    v, t = _check(vertices, tri)
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(t)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    faces = np.empty(len(t), dtype=[("n", "u1"), ("ids", "<i4", (3,))])
    faces["n"], faces["ids"] = 3, t
    return header + v.astype("<f4").tobytes() + faces.tobytes()


def obj_bytes(vertices: np.ndarray, tri: np.ndarray) -> bytes:
    """Wavefront OBJ text (1-based face ids)."""
    v, t = _check(vertices, tri)
    lines = [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in v] + [f"f {a} {b} {c}" for a, b, c in t + 1]
    return ("\n".join(lines) + "\n").encode()
