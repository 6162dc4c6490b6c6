"""The numpy + OpenCV mirror of on-device post-processing; imports neither torch nor any converter.

This is what runs on a Raspberry Pi: preprocess (roi, crop, normalise) -> a target's params -> bfm
(de-normalise, vertices) -> geometry (image pixels, pose) -> draw (overlays) / meshes (.ply, .obj files).
"""

from edge3dfa.runtime.bfm import BFM, denormalise, load_bfm68, load_dense_bfm, reconstruct
from edge3dfa.runtime.geometry import pose, to_image
from edge3dfa.runtime.preprocess import (
    INPUT_SIZE,
    as_bgr_uint8,
    crop,
    crops_from_rois,
    decode_image,
    normalise,
    printable,
    read_image,
    roi_from_box,
    roi_from_landmarks,
)

__all__ = ["BFM", "INPUT_SIZE", "as_bgr_uint8", "crop", "crops_from_rois", "decode_image", "denormalise", "landmarks",
           "load_bfm68", "load_dense_bfm", "normalise", "pose", "printable", "read_image", "reconstruct",
           "roi_from_box", "roi_from_landmarks", "to_image"]


def landmarks(params_norm, roi_boxes, bfm: BFM | None = None):  # noqa: ANN001, ANN201
    """Network output [N,62] + roi boxes [N,4] -> vertices [N,3,V] in image pixels (68 unless a dense BFM)."""
    return to_image(reconstruct(denormalise(params_norm, bfm), bfm), roi_boxes)
