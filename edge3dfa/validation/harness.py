"""Find artifacts, run each one and its PyTorch reference on the same crops, and collect report rows.

Every artifact is scored on exactly the crops its reference sees, so an accuracy difference is the
conversion's and nothing else. The reference is the checkpoint named in the manifest's ``source``
(verified by sha256), or the zoo checkpoint of the same name, or what ``--reference`` gives.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge3dfa import progress, runtime
from edge3dfa.assets import sha256_file
from edge3dfa.datasets import EvalSet
from edge3dfa.errors import Edge3dfaError
from edge3dfa.logs import one_line, write_crash_log
from edge3dfa.manifest import SCHEMA, SCHEMA_NAME, Manifest, manifest_path
from edge3dfa.measure import bootstrap, metrics
from edge3dfa.measure.parity import compare as compare_params
from edge3dfa.measure.predict import BATCH, predict_all
from edge3dfa.measure.timing import LatencyConfig, measure
from edge3dfa.models.checkpoint import Checkpoint
from edge3dfa.target import CHECKPOINT_SUFFIXES, Target, open_target, target_suffixes, verify_artifact
from edge3dfa.validation.rows import Row

NO_REFERENCE = "none"
PRECISION_ORDER = ("fp32", "fp16", "w8", "dyn-int8", "int8")
REPORT_FILES = {"report.json"}
#: runtimes whose speed says nothing about a device: accuracy is scored, latency is not timed
NOT_TIMED = {"mil-numpy": "not timed: numpy evaluation of the CoreML program, not the CoreML runtime"}


@dataclass
class Entry:
    """An artifact to evaluate: its file, its manifest and where the manifest was read from."""

    path: Path
    manifest: Manifest
    manifest_path: Path
    #: False when the user chose not to check the artifact against its manifest (``validate --no-verify``)
    verify: bool = True


def _inside_package(p: Path, root: Path) -> bool:
    return any(parent.suffix.lower() == ".mlpackage" for parent in p.relative_to(root).parents)


def _is_manifest(mpath: Path) -> bool:
    """A JSON file that claims to be an edge3dfa manifest, or sits beside an artifact of the same name (then a
    broken one is an error naming it, not a file to pass over)."""
    beside = any(mpath.with_suffix(s).exists() for s in target_suffixes() if s not in CHECKPOINT_SUFFIXES)
    try:
        data = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return beside  # beside an artifact, Manifest.read then says what is wrong with it
    schema = data.get("schema") if isinstance(data, dict) else None
    return beside or (isinstance(schema, str) and schema.startswith(SCHEMA_NAME + "/"))


def _walk(root: Path) -> Iterator[Path]:
    """Every file and folder under ``root``, sorted, except dot-entries and all inside them: the temp folders of
    a running or killed conversion (``.convert.PID-XXXX.tmp``, ``fileio.TEMP_NAME``), hidden files. A folder that
    vanishes during the walk (a conversion finishing) is skipped, not an error."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(dirs + files):
            if not name.startswith("."):
                yield Path(folder) / name


def discover(folder: str | os.PathLike, verify: bool = True) -> list[Entry]:
    """Every artifact under ``folder`` (recursive) with a valid manifest that it matches.

    An artifact file without its manifest, a manifest naming a missing artifact, a link to nothing (a missing
    target or a loop) named like an artifact, or a folder with no artifact at all is an Edge3dfaError naming the
    file; so is an artifact that does not match its manifest (sha256, format, precision, input:
    ``edge3dfa.target.verify_artifact``) unless ``verify=False``. Dot-entries (temp folders of a running or
    killed conversion) are ignored (``_walk``), and so is a ``.json`` that is not a regular file: a named pipe
    would block the walk forever (an artifact beside it then has no manifest, which is an error).
    """
    root = Path(folder)
    if not root.is_dir():
        raise Edge3dfaError(f"not a folder: {root}")
    paths = list(_walk(root))
    entries, named = [], set()
    for mpath in sorted(p for p in paths if p.suffix == ".json"):
        if mpath.name in REPORT_FILES or _inside_package(mpath, root) or not mpath.is_file() \
                or not _is_manifest(mpath):
            continue
        m = Manifest.read(mpath)
        art = mpath.parent / m.artifact
        if manifest_path(art) != mpath:
            raise Edge3dfaError(f"manifest {mpath}: field 'artifact' names {m.artifact!r}, whose manifest would be "
                                f"{manifest_path(art).name} (renamed or swapped files?)")
        if not art.exists():
            raise Edge3dfaError(f"artifact {art} named by {mpath} is missing")
        if verify:
            m = verify_artifact(art)
        named.add(os.path.realpath(art))
        entries.append(Entry(art, m, mpath, verify))
    suffixes = set(target_suffixes())
    for p in paths:  # (realpath, not Path.resolve: that raises RuntimeError on a symlink loop)
        if p.suffix.lower() in suffixes and not _inside_package(p, root) and os.path.realpath(p) not in named:
            if not p.exists():
                raise Edge3dfaError(f"{p} is a link to nothing (its target is missing, or the link is a loop)")
            raise Edge3dfaError(f"{p} has no manifest ({manifest_path(p).name}); re-run edge3dfa convert")
    if not entries:
        raise Edge3dfaError(f"no edge3dfa artifacts in {root}: no *.json manifest of schema {SCHEMA}")
    return entries


def find_reference(m: Manifest, override: str | os.PathLike | None = None) -> Checkpoint:
    """The source checkpoint of manifest ``m``, checked by sha256; ``override`` wins if given."""
    from edge3dfa import assets
    from edge3dfa.models import MODELS

    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise Edge3dfaError(f"reference checkpoint not found: {p}")
        return replace(Checkpoint.open(p), name=m.model)  # arch from the checkpoint's keys
    want = (m.source or {}).get("sha256")
    candidates = []
    if (m.source or {}).get("path"):
        candidates.append(Path(m.source["path"]))
    spec = MODELS.get(m.model)
    if spec is not None and spec.checkpoint_asset:
        try:
            candidates.append(assets.fetch(spec.checkpoint_asset))
        except Edge3dfaError:
            pass
    for p in candidates:
        if p.is_file() and (not want or sha256_file(p) == want):
            return replace(Checkpoint.open(p, arch=m.model if spec else None), name=m.model)
    raise Edge3dfaError(f"the PyTorch checkpoint {m.model} was converted from is not found here (source "
                        f"{(m.source or {}).get('path')}, sha256 {str(want)[:12]}…); pass --reference CHECKPOINT")


def _score(params: np.ndarray, data: EvalSet) -> np.ndarray:
    pred = runtime.landmarks(params, data.roi_boxes)[:, :2]
    return metrics.nme(pred, data.gt)


def _score_landmarks(landmarks: np.ndarray, data: EvalSet) -> np.ndarray:
    """NME of a bundle's own landmark output [N,68,3] (crop pixels), mapped to the photo with each face's roi
    as the app maps it (``bundle.to_photo``, the contract's two ROI_MAPPING lines)."""
    from edge3dfa import bundle

    pred = bundle.to_photo(landmarks, data.roi_boxes).transpose(0, 2, 1)[:, :2]
    return metrics.nme(pred, data.gt)


def _bundle_outputs(target: Target, x: np.ndarray, batch: int, desc: str) -> tuple[np.ndarray, np.ndarray,
                                                                                  dict[str, float]]:
    """A regressor bundle's landmarks [N,68,3], its params normalised back [N,62], and how far its landmarks and
    pose are from the spec of its own params (``measure.parity.head_departure``). A head that departs more than
    float rounding (``bundle.HEAD_LANDMARK_PX`` / ``HEAD_POSE_DEG``, means) is not the contract's post-processing:
    an Edge3dfaError, so the row is an error whatever its NME (a swapped yaw and pitch leaves NME untouched)."""
    from edge3dfa import bundle
    from edge3dfa.measure.parity import head_departure
    from edge3dfa.measure.predict import predict_bundle_all

    out = predict_bundle_all(target, x, batch, desc)
    head = head_departure(out)
    if not (head["landmark_mean_px"] <= bundle.HEAD_LANDMARK_PX and head["pose_mean_deg"] <= bundle.HEAD_POSE_DEG):
        raise Edge3dfaError(f"{target.name}: its landmarks / pose are {head['landmark_mean_px']:.3g} px / "
                            f"{head['pose_mean_deg']:.3g} deg (means) from what its own params output gives "
                            f"(edge3dfa.runtime; at most {bundle.HEAD_LANDMARK_PX} px / {bundle.HEAD_POSE_DEG} deg): "
                            "its post-processing is not the contract's")
    return out["landmarks"], bundle.normalised_params(out["params"]), head


def artifact_row(key: str, *, model: str, fmt: str, precision: str, source_sha: str) -> Row:
    """An artifact's report row before it is scored (e.g. for a conversion that failed)."""
    return Row(key=key, role="artifact", model=model, format=fmt, precision=precision, source_sha256=source_sha)


def _model_info(ref_target: Target | None, ref: Checkpoint | None, m: Manifest | None) -> dict[str, Any]:
    """Name, arch and complexity of the source model (params/MACs need the PyTorch module)."""
    module = getattr(ref_target, "model", None)
    widen = (m.source or {}).get("widen_factor") if m is not None else None
    arch = m.arch if m is not None else type(module).__name__
    info = {"name": ref.name if ref else m.model, "arch": f"{arch} x{widen:g}" if widen else arch,
            "checkpoint": str(ref.path) if ref else (m.source or {}).get("path"),
            "sha256": ref.sha256 if ref else (m.source or {}).get("sha256"), "params": None, "macs": None}
    if module is not None:
        from edge3dfa.models import count_macs, count_params

        info.update(params=count_params(module), macs=count_macs(module, runtime.INPUT_SIZE))
    return info


def _precision_rank(p: str) -> int:
    return PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER)


def evaluate(entries: list[Entry], data: EvalSet, *, latency: LatencyConfig | None = None,
             reference: str | os.PathLike | Checkpoint | None = None, threads: int | None = None,
             batch: int = BATCH, root: str | os.PathLike | None = None, skip_unavailable: bool = False,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every entry and its reference on ``data``; returns {"models": {sha: info}, "targets": [Row]}.

    ``reference``: None finds each manifest's source checkpoint, a path or Checkpoint is used for all,
    ``"none"`` scores artifacts alone (no torch needed, e.g. on a board; deltas and parity are then taken
    against the same format's fp32 artifact where there is one). An artifact that cannot be opened, run or
    scored is a row with status "error" and the reason (an unexpected exception also writes its traceback to
    a log, named in the reason), never a silent skip: one broken runtime does not hide the other rows. Only
    ``skip_unavailable`` (the user's choice) turns "runtime not installed here" into status "skipped".
    ``threads`` is the thread count of the accuracy pass (default 1: on a shared 2-core machine, 2 threads
    made the mb05 full-set pass 4x slower for torch and 10x for the numpy CoreML evaluator, as threads wait
    on each other; latency is measured at every count anyway).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    root = Path(root) if root is not None else None
    rel = (lambda p: os.path.relpath(p, root)) if root is not None else str
    run = _Run(data, rel, latency or LatencyConfig(), threads or 1, batch, skip_unavailable, log)
    groups, others = _groups(entries, reference)
    models: dict[str, Any] = {}
    rows: list[Row] = []
    for sha, (ref, group) in groups.items():
        ref_target = ref_params = ref_faces = None
        if ref is not None:
            head, ref_params, ref_target = run.reference(ref, sha)
            ref_faces = head.per_face
            rows.append(head)
        models[sha] = _model_info(ref_target, ref, group[0].manifest if group else None)
        group = sorted(group, key=lambda e: (e.manifest.format, _precision_rank(e.manifest.precision), str(e.path)))
        scored = [run.one(e, sha, ref_params, ref_faces) for e in group]
        sources = [_source_of(e.manifest) for e in group]
        rows += [row for row, _ in _compare_with_fp32(_compare_bundles(scored, data.yaw, sources), data.yaw, sources)]
    rows += [_not_applicable(e, rel) for e in others]
    return {"models": models, "targets": rows}


def _groups(entries: list[Entry], reference: str | os.PathLike | Checkpoint | None
            ) -> tuple[dict[str, tuple[Checkpoint | None, list[Entry]]], list[Entry]]:
    """The landmark regressors by source checkpoint (sha256 -> (its reference or None, entries)), and the
    others (detectors...), which are listed, not scored."""
    alone = isinstance(reference, str) and reference.lower() == NO_REFERENCE
    groups: dict[str, tuple[Checkpoint | None, list[Entry]]] = {}
    if isinstance(reference, Checkpoint):  # reported even when nothing was converted
        groups[reference.sha256] = (reference, [])
    others = [e for e in entries if not is_regressor(e.manifest)]
    for e in entries:
        if e in others:
            continue
        if alone:
            sha = str((e.manifest.source or {}).get("sha256") or e.manifest.model)
            groups.setdefault(sha, (None, []))[1].append(e)
            continue
        ref = reference if isinstance(reference, Checkpoint) else find_reference(e.manifest, reference)
        groups.setdefault(ref.sha256, (ref, []))[1].append(e)
    return groups, others


def _not_applicable(e: Entry, rel: Callable[[Path], str]) -> Row:
    m = e.manifest
    return Row(key=f"{m.model}/{m.format}/{e.path.name}", role="artifact", status="not_applicable",
               reason="not a 62-param landmark regressor (detector or other head): validate scores landmark "
                      "regressors only", model=m.model, format=m.format, precision=m.precision,
               artifact=rel(e.path), manifest=rel(e.manifest_path), size_bytes=int(m.size_bytes),
               source_sha256=str((m.source or {}).get("sha256")))


Scored = tuple[Row, np.ndarray | None]


def _compare_with_fp32(scored: list[Scored], yaw: np.ndarray, sources: list[str] | None = None) -> list[Scored]:
    """ΔNME (with its paired bootstrap interval) and parity of every scored row against the fp32 row of the same
    format and source checkpoint (``sources``, one per row; None: all one source): the base without a reference."""
    out = []
    sources = sources or [""] * len(scored)
    for (row, params), mine in zip(scored, sources):
        fp32 = next(((r, p) for (r, p), src in zip(scored, sources) if r.format == row.format and src == mine
                     and r.precision == "fp32" and (r.bundle is None) == (row.bundle is None) and r.status == "ok"
                     and p is not None), None)
        if row.status == "ok" and params is not None and fp32 is not None and row.precision != "fp32":
            # an fp32 row is the base of its format, never compared with another fp32
            row = replace(row, delta_vs_fp32=bootstrap.paired_delta(row.per_face, fp32[0].per_face, yaw),
                          parity_vs_fp32=compare_params(fp32[1], params))
        out.append((row, params))
    return out


def _source_of(m: Manifest) -> str:
    """What an artifact was converted from: its source checkpoint's sha256 (else its model name). A group shares
    one reference, but with ``--reference CHECKPOINT`` it may hold artifacts of several models."""
    return str((m.source or {}).get("sha256") or m.model)


def _compare_bundles(scored: list[Scored], yaw: np.ndarray, sources: list[str]) -> list[Scored]:
    """Each phone bundle's ΔNME (paired, with its interval) against its params artifact: the same source checkpoint
    (``sources``, one per row), format and precision without ``--bundle``. Its own landmark output vs the params
    through the numpy runtime: what the fused post-processing changes (``gates`` ``max_bundle_delta_nme``)."""
    out = []
    for (row, params), mine in zip(scored, sources):
        if row.bundle is not None:
            base = next((r for (r, _), src in zip(scored, sources) if r.bundle is None and src == mine
                         and r.format == row.format and r.precision == row.precision and r.status == "ok"), None)
            vs = None
            if base is not None and row.status == "ok":
                vs = {"key": base.key, "artifact": base.artifact,
                      "delta": bootstrap.paired_delta(row.per_face, base.per_face, yaw)}
            row = replace(row, bundle={**row.bundle, "vs_params": vs})
        out.append((row, params))
    return out


def bundle_record(m: Manifest) -> dict[str, Any] | None:
    """What a bundle row carries from its manifest: the contract's input and its parity vs the executable spec."""
    if m.bundle is None:
        return None
    spec_parity = {name: {k: fig.get(k) for k in ("bundle_landmark_mean_px", "bundle_landmark_max_px",
                                                   "pose_max_deg")}
                   for name, fig in (m.parity or {}).items()
                   if isinstance(fig, dict) and "bundle_landmark_mean_px" in fig}
    spec = m.bundle.get("input") or {}
    return {"contract_version": m.bundle.get("version"), "channel_order": spec.get("channel_order"),
            "layout": spec.get("layout"), "spec_parity": spec_parity, "vs_params": None}


def is_regressor(m: Manifest) -> bool:
    """A 62-param landmark regressor, or a regressor phone bundle (scored from its own landmark output)."""
    from edge3dfa.models import task_of

    if m.bundle is not None:
        return m.bundle.get("kind") == "regressor"
    return task_of(m.arch) == "regressor" and m.output.get("name", "params") == "params"


def runtime_missing(err: Edge3dfaError) -> bool:
    """True when ``err`` says the artifact's runtime is not installed here (targets raise it from an ImportError)."""
    return isinstance(err.__cause__, ImportError)


@dataclass
class _Run:
    """What every row of one evaluation shares."""

    data: EvalSet
    rel: Callable[[Path], str]
    latency: LatencyConfig
    threads: int
    batch: int
    skip_unavailable: bool
    log: Callable[[str], None]

    def reference(self, ref: Checkpoint, sha: str) -> tuple[Row, np.ndarray, Target]:
        """The PyTorch reference's row, its params and its target."""
        self.log(f"reference: torch {ref.path.name} on {len(self.data)} faces ({self.data.name})")
        with progress.target(progress.REFERENCE):
            with progress.step("evaluate"):
                target = ref.target(self.threads)
                params = predict_all(target, self.data.inputs, self.batch, f"torch {ref.name}")
                nme = _score(params, self.data)
            timed = self._timed(ref.target)
        row = Row(key=f"{ref.name}/torch/reference", role="reference", model=ref.name, format="torch",
                  precision="fp32", runtime="torch", artifact=self.rel(ref.path), manifest=None,
                  size_bytes=ref.path.stat().st_size, source_sha256=sha, nme=metrics.summarize(nme, self.data.yaw),
                  per_face=nme, latency=timed)
        return row, params, target

    def _timed(self, open_at: Callable[[int], Target]) -> list[dict]:
        if not self.latency.enabled:
            progress.skip_rest("latency")
            return []
        with progress.step("latency"):
            return measure(open_at, self.data.inputs, self.latency)

    def one(self, e: Entry, sha: str, ref_params: np.ndarray | None, ref_faces: np.ndarray | None) -> Scored:
        """One artifact's row and params; whatever goes wrong becomes the row's status and reason."""
        m = e.manifest
        row = Row(key=f"{m.model}/{m.format}/{e.path.name}", role="artifact", model=m.model, format=m.format,
                  precision=m.precision, runtime="?", artifact=self.rel(e.path), manifest=self.rel(e.manifest_path),
                  size_bytes=int(m.size_bytes), source_sha256=sha,
                  quantization=m.quantization,  # the --nme-budget search record, shown by the report
                  manifest_verified=e.verify,  # False: used with --no-verify, so at best NOT VERIFIED
                  bundle=bundle_record(m))
        if progress.active() is None:  # else the progress line says it
            self.log(f"evaluating {self.rel(e.path)} ({m.format} {m.precision})")
        with progress.target(f"{m.format} {m.precision}{' bundle' if m.bundle is not None else ''}"):
            return self._one(e, row, ref_params, ref_faces)

    def _one(self, e: Entry, row: Row, ref_params: np.ndarray | None, ref_faces: np.ndarray | None) -> Scored:
        try:
            with progress.step("evaluate"):
                target = open_target(e.path, threads=self.threads, verify=e.verify)
                row = replace(row, runtime=target.runtime)
                row, params = self._score(e, target, row, ref_params, ref_faces)
            return self._latency(e, target, row), params
        except Edge3dfaError as err:
            if self.skip_unavailable and runtime_missing(err):
                row = replace(row, status="skipped", reason=f"skipped (--skip-unavailable): {one_line(err)}")
            else:
                row = row.failed(one_line(err))
        except OSError as err:  # unreadable file, full disk...: the user's to fix, no traceback needed
            where = f" {err.filename}" if err.filename else ""
            row = row.failed(f"cannot use{where}: {err.strerror or one_line(err)}")
        except Exception as err:  # noqa: BLE001 - one broken runtime must not hide the other rows
            crash = write_crash_log(err)
            row = row.failed(f"internal error: {type(err).__name__}: {one_line(err)} (traceback: {crash})",
                             str(crash))
        self.log(f"  {row.status}: {row.reason}")
        progress.skip_rest()
        return row, None

    def _score(self, e: Entry, target: Target, row: Row, ref_params: np.ndarray | None,
               ref_faces: np.ndarray | None) -> Scored:
        desc = f"{e.manifest.format} {e.manifest.precision}"
        if row.bundle is not None:
            landmarks, params, head = _bundle_outputs(target, self.data.inputs, self.batch, desc)
            row = replace(row, bundle={**row.bundle, "vs_own_params": head})
        else:
            landmarks, params = None, predict_all(target, self.data.inputs, self.batch, desc)
        bad = int((~np.isfinite(params).all(axis=1)).sum())
        if bad:
            raise Edge3dfaError(f"{e.path.name}: non-finite outputs (NaN or Inf) for {bad} of {len(params)} faces")
        with np.errstate(over="ignore", invalid="ignore"):  # huge outputs: checked just below
            nme = _score(params, self.data) if landmarks is None else _score_landmarks(landmarks, self.data)
        bad = int((~np.isfinite(nme)).sum())
        if bad:
            raise Edge3dfaError(f"{e.path.name}: outputs so large that the landmarks of {bad} of {len(nme)} faces "
                                "overflow (not finite)")
        summary = metrics.summarize(nme, self.data.yaw)
        row = replace(row, nme=summary, per_face=nme,
                      delta_vs_reference=(bootstrap.paired_delta(nme, ref_faces, self.data.yaw)  # same faces
                                          if ref_faces is not None else None),
                      parity=compare_params(ref_params, params) if ref_params is not None else None)
        return row, params

    def _latency(self, e: Entry, target: Target, row: Row) -> Row:
        """The row with its latency, or the note saying why it has none."""
        if target.runtime in NOT_TIMED or not self.latency.enabled:
            progress.skip_rest("latency")
            return replace(row, latency_note=NOT_TIMED.get(target.runtime))
        with progress.step("latency"):
            if row.bundle is not None:  # the runtime on the bundle's own uint8 input, as an app calls it
                from edge3dfa.bundle import image_for

                contract = target.bundle
                return replace(row, latency=measure(lambda n: open_target(e.path, threads=n, verify=e.verify),
                                                    self.data.inputs, self.latency,
                                                    prepare=lambda x: image_for(contract, x),
                                                    call=lambda t, u: t.predict_image(u)))
            return replace(row, latency=measure(lambda n: open_target(e.path, threads=n, verify=e.verify),
                                                self.data.inputs, self.latency))
