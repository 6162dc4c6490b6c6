"""Video: detect once, then re-crop every face from its previous landmarks (upstream demo_video.py), with a
lost-track test and optional one-euro smoothing. numpy + OpenCV only, like the runtime.

Lost-track test (the "probe"): each face is regressed twice, in the roi from its previous landmarks and in
that roi shifted diagonally by ``probe`` x its side. A regressor that sees a face reports where the face is,
so both crops give the same landmarks; one that sees no face (background, a face that left the crop) draws
its mean face where the crop is, so the landmarks move with the crop. ``anchoring`` = landmark shift / crop
shift, projected on the shift: ~0 on a face, ~1 on no face. Measured on mb05 with a 10% probe: |a| <= 0.12
for a face shifted by up to 30% of the crop, rotated up to 45 deg or scaled 0.6-1.5x in it; 0.48-1.4 for
gray, black, noise, hair, shirt and a face half out of the crop. Comparing the new landmarks' roi with the
crop's alone cannot tell: a plain gray crop gives IoU 0.81, a face that moved 10% of the crop 0.84.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge3dfa import runtime
from edge3dfa.pipeline import FaceAligner, Faces
from edge3dfa.runtime.detect import box_iou

DETECTED, TRACKED, LOST = "detected", "tracked", "lost"
#: one-euro (min_cutoff Hz, beta per face size/s) chosen on the test clip: 4x less jitter at rest, +0.3% NME
#: while the face crosses the frame in about a second
SMOOTH = (0.5, 80.0)


class OneEuroFilter:
    """Casiez et al. 2012 low-pass filter whose cutoff rises with speed: still values are smoothed hard,
    moving ones follow with little lag. Element-wise over any array; ``t`` in seconds.

    min_cutoff (Hz) sets the smoothing at rest, beta how fast the cutoff rises with speed (units of x / s);
    shared: one cutoff from the mean speed of all elements, so points of one face are smoothed alike and its
    shape does not warp while it moves (on the test clip: 1.2% NME in motion against 1.8% element-wise).
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0, shared: bool = False):
        self.min_cutoff, self.beta, self.d_cutoff, self.shared = min_cutoff, beta, d_cutoff, shared
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * np.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None or t <= self._t:
            self._x, self._dx, self._t = x, np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * (x - self._x) / dt + (1 - a_d) * self._dx
        speed = np.abs(self._dx).mean() if self.shared else np.abs(self._dx)
        a = self._alpha(self.min_cutoff + self.beta * speed, dt)
        self._x, self._t = a * x + (1 - a) * self._x, t
        return self._x.copy()


def anchoring(main: np.ndarray, probe: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Landmarks [N,>=2,68] from the crops and from the crops moved by ``shift`` [N,2] -> [N] mean landmark
    motion / crop motion along the shift: 0 when the landmarks stay on the image content, 1 when they ride
    with the crop."""
    delta = (np.asarray(probe)[:, :2] - np.asarray(main)[:, :2]).mean(2)
    shift = np.asarray(shift, np.float64)
    return (delta * shift).sum(1) / (shift * shift).sum(1)


@dataclass
class _Track:
    id: int
    landmarks: np.ndarray  # [3,68] raw, the next frame's crop comes from these
    score: float  # detector score when the track was (re)detected
    filter: OneEuroFilter | None = None
    scale: float = 1.0  # roi side at detection: the filter runs in face sizes, so beta does not depend on resolution


@dataclass
class TrackedFrame:
    """One frame's result: faces (smoothed when the tracker smooths), their track ids, and how they were found."""

    index: int
    status: str  # "detected" (the detector ran), "tracked" (re-cropped from landmarks only), "lost" (no face)
    faces: Faces
    ids: list[int]
    anchoring: np.ndarray  # [K] lost-track statistic of each face (see the module docstring)

    def to_json(self) -> dict[str, Any]:
        faces = self.faces.to_json()
        for f, i, a in zip(faces, self.ids, self.anchoring):
            f["id"], f["anchoring"] = i, round(float(a), 4)
        return {"frame": self.index, "status": self.status, "faces": faces}


class Tracker:
    """Faces through a video, one :meth:`update` per frame: the detector runs on the first frame, when a face
    is lost (then the faces still tracked are kept and the new ones added) and every ``redetect_every`` frames
    (0: never); otherwise each face is re-cropped from its previous landmarks and regressed with its probe in
    one batch.

    probe: shift of the probe crop, in roi sides (0 turns the lost-track test off);
    max_anchoring: a face whose anchoring exceeds it is lost; scale_range: so is one whose new landmark roi
    is this much smaller or larger than the crop it came from (a collapsed or exploded fit), or under
    min_size pixels; of two tracks whose rois overlap by more than max_duplicate_iou, the younger one ends;
    smooth: a one-euro filter's (min_cutoff, beta) applied to landmarks (in face sizes) and pose (radians)
    of what is reported; tracking itself always uses the raw landmarks.
    """

    def __init__(self, aligner: FaceAligner, probe: float = 0.1, max_anchoring: float = 0.3,
                 scale_range: tuple[float, float] = (0.5, 2.0), redetect_every: int = 0,
                 smooth: tuple[float, float] | None = None, min_iou_new: float = 0.3, fps: float = 30.0,
                 min_size: float = 16.0, max_duplicate_iou: float = 0.5):
        self.aligner = aligner
        self.probe, self.max_anchoring, self.scale_range = probe, max_anchoring, scale_range
        self.min_size, self.max_duplicate_iou = min_size, max_duplicate_iou
        self.redetect_every, self.smooth, self.min_iou_new = redetect_every, smooth, min_iou_new
        self.fps = fps
        self.tracks: list[_Track] = []
        self.index = -1
        self._since_detect = 0
        self._next_id = 0

    def _regress(self, img: np.ndarray, rois: np.ndarray, boxes: np.ndarray | None = None
                 ) -> tuple[Faces, np.ndarray, np.ndarray]:
        """Faces in ``rois`` plus their probe, in one batch -> (faces, anchoring [K], kept mask [K])."""
        k = len(rois)
        if k == 0 or self.probe <= 0:
            faces = self.aligner.align(img, rois, boxes)
            return faces, np.zeros(k), self._scale_ok(faces, rois)
        side = rois[:, 2] - rois[:, 0]
        shift = np.repeat((self.probe * side)[:, None], 2, 1)
        both = self.aligner.align(img, np.concatenate([rois, rois + np.tile(shift, 2)]))
        faces = _take(both, slice(0, k))
        if boxes is not None:
            faces.boxes = np.asarray(boxes, np.float32)
        a = anchoring(faces.landmarks, both.landmarks[k:], shift)
        return faces, a, self._scale_ok(faces, rois) & (a <= self.max_anchoring)

    def _scale_ok(self, faces: Faces, rois: np.ndarray) -> np.ndarray:
        new = runtime.roi_from_landmarks(faces.landmarks) if len(faces) else np.zeros((0, 4))
        side = new[:, 2] - new[:, 0]
        ratio = side / (rois[:, 2] - rois[:, 0])
        return (ratio >= self.scale_range[0]) & (ratio <= self.scale_range[1]) & (side >= self.min_size)

    def _detect(self, img: np.ndarray, keep_rois: np.ndarray) -> tuple[Faces, np.ndarray, np.ndarray]:
        """New faces away from the ones still tracked: detector roi, then upstream's refinement in the
        landmark roi (the crop policy tracking uses), probe included (a false detection fails it too)."""
        boxes = self.aligner.detect(img)
        if len(boxes) and len(keep_rois):
            boxes = boxes[box_iou(runtime.roi_from_box(boxes), keep_rois).max(1) < self.min_iou_new]
        if not len(boxes):
            return self.aligner.align(img, np.zeros((0, 4))), np.zeros(0), np.zeros(0, bool)
        first = self.aligner.align(img, runtime.roi_from_box(boxes), boxes)
        return self._regress(img, runtime.roi_from_landmarks(first.landmarks).astype(np.float32), boxes)

    def update(self, img: np.ndarray, t: float | None = None) -> TrackedFrame:
        """Next frame (BGR) at time ``t`` seconds, for the smoother (default: frame index / ``fps``)."""
        img = runtime.as_bgr_uint8(img)
        self.index += 1
        t = self.index / self.fps if t is None else float(t)
        parts: list[tuple[Faces, np.ndarray, list[_Track]]] = []
        detect = not self.tracks or (self.redetect_every > 0 and self._since_detect >= self.redetect_every)
        if self.tracks:
            rois = runtime.roi_from_landmarks(np.stack([tr.landmarks for tr in self.tracks])).astype(np.float32)
            faces, a, ok = self._regress(img, rois)
            faces.boxes = np.c_[_bbox(faces.landmarks), [tr.score for tr in self.tracks]].astype(np.float32)
            detect = detect or not ok.all()
            keep = np.flatnonzero(ok & ~self._duplicates(faces.landmarks, ok))
            self.tracks = [self.tracks[i] for i in keep]
            parts.append((_take(faces, keep), a[keep], self.tracks))
        if detect:
            keep_rois = runtime.roi_from_landmarks(parts[0][0].landmarks) if parts and len(parts[0][0]) else \
                np.zeros((0, 4))
            faces, a, ok = self._detect(img, keep_rois)
            self._since_detect = 0
            keep = np.flatnonzero(ok)
            faces = _take(faces, keep)
            new = [self._new_track(faces, i) for i in range(len(faces))]
            self.tracks = self.tracks + new
            parts.append((faces, a[keep], new))
        self._since_detect += 1
        for faces, _, tracks in parts:
            for i, tr in enumerate(tracks):
                tr.landmarks = faces.landmarks[i].copy()
        faces = _concat([p[0] for p in parts]) if parts else None
        tracks = [tr for p in parts for tr in p[2]]
        a = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
        if faces is None or not len(faces):
            self.tracks = []
            return TrackedFrame(self.index, LOST, self.aligner.align(img, np.zeros((0, 4))), [], np.zeros(0))
        if self.smooth:
            faces = self._smoothed(faces, tracks, t)
        return TrackedFrame(self.index, DETECTED if detect else TRACKED, faces, [tr.id for tr in tracks], a)

    def _duplicates(self, landmarks: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """[K] True for a track that now sits on the same face as an older kept one (two crops drifted together)."""
        iou = np.triu(box_iou(*[runtime.roi_from_landmarks(landmarks)] * 2), 1) * ok[:, None]
        return (iou > self.max_duplicate_iou).any(0)

    def _new_track(self, faces: Faces, i: int) -> _Track:
        self._next_id += 1
        roi = runtime.roi_from_landmarks(faces.landmarks[i:i + 1])[0]
        filt = OneEuroFilter(*self.smooth, shared=True) if self.smooth else None
        return _Track(self._next_id - 1, faces.landmarks[i].copy(), float(faces.boxes[i, 4]), filt,
                      float(roi[2] - roi[0]))

    def _smoothed(self, faces: Faces, tracks: list[_Track], t: float) -> Faces:
        lm, pose = faces.landmarks.copy(), faces.pose.copy()
        for i, tr in enumerate(tracks):
            x = tr.filter(np.r_[lm[i].ravel() / tr.scale, np.radians(pose[i])], t)
            lm[i] = (x[:-3] * tr.scale).reshape(lm[i].shape)
            pose[i] = np.degrees(x[-3:])
        return Faces(faces.boxes, faces.roi_boxes, faces.params, lm, pose, faces.vertices)


def _bbox(landmarks: np.ndarray) -> np.ndarray:
    p = np.asarray(landmarks)
    return np.c_[p[:, 0].min(1), p[:, 1].min(1), p[:, 0].max(1), p[:, 1].max(1)]


def _take(faces: Faces, idx: slice | np.ndarray) -> Faces:
    return Faces(faces.boxes[idx], faces.roi_boxes[idx], faces.params[idx], faces.landmarks[idx],
                 faces.pose[idx], None if faces.vertices is None else faces.vertices[idx])


def _concat(parts: list[Faces]) -> Faces:
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    dense = None if any(p.vertices is None for p in parts) else cat("vertices")
    return Faces(cat("boxes"), cat("roi_boxes"), cat("params"), cat("landmarks"), cat("pose"), dense)
