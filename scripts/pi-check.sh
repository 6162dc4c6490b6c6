#!/usr/bin/env bash
# make pi-check: edge3dfa on arm64 under qemu-user emulation, compared with x86 (README "Raspberry Pi check").
#
# On x86: convert mb05 (TFLite fp32 and full int8) and FaceBoxes (TFLite fp32) once, params artifacts and phone
# bundles (--bundle), build the edge3dfa wheel, run the example photos (edge3dfa run, with the params artifacts
# and with the bundles), unrounded landmarks of the photos and of AFLW2000-3D crops (scripts/pi_landmarks.py),
# the bundles against the spec and the detector bundle against the runtime's decode + NMS
# (scripts/pi_bundles.py) and edge3dfa validate --reference none on an AFLW2000-3D subset. In an arm64 Debian
# root (debootstrap + qemu-user-static, built once and cached): install the wheel with its [pi] extra, check
# torch and tensorflow are absent, and run the same commands on the same files once per emulated Pi CPU. Then
# scripts/pi_compare.py prints the sides and writes $PI_OUT/result.json; exit 1 when fp32 landmarks of the
# crops differ by more than 0.001 px or anything failed. Needs root (debootstrap, chroot, mounts). Latency
# under emulation says nothing about a Pi and is not measured.
#
# The emulated CPU is a Pi's, not qemu's default "max": under qemu 7.2 "max" (SVE) numpy's matmul returns NaN
# for a third of the faces. The root also sees the Pi's /proc/cpuinfo (qemu 7.2 shows the host's) and /sys:
# without them XNNPACK's cpuinfo fails (or crashes) and LiteRT silently runs its non-XNNPACK kernels.
#
# Environment: PI_ROOT (default ~/.cache/edge3dfa/pi-root), PI_OUT (out/pi-check), PI_SAMPLES (300 crops
# evaluated), PI_CROPS (50 crops whose landmarks are compared),
# PI_CPUS ("cortex-a72 cortex-a76": Pi 4 and Pi 5; cortex-a53 = Pi 3 / Zero 2 W), PI_MIRROR
# (http://deb.debian.org/debian), PI_SUITE (bookworm), PI_PIN (1: the root gets the x86 venv's numpy, OpenCV
# and LiteRT versions, so the sides differ by architecture only), PI_RECONVERT (1: convert again), VENV (.venv),
# EDGE3DFA_ASSETS (../shared/assets).
set -euo pipefail

cd "$(dirname "$(realpath "$0")")/.."
REPO=$PWD
ROOT=$(realpath -m "${PI_ROOT:-$HOME/.cache/edge3dfa/pi-root}")
OUT=$(realpath -m "${PI_OUT:-out/pi-check}")
SAMPLES=${PI_SAMPLES:-300}
CROPS=${PI_CROPS:-50}
CPUS=${PI_CPUS:-cortex-a72 cortex-a76}
MIRROR=${PI_MIRROR:-http://deb.debian.org/debian}
SUITE=${PI_SUITE:-bookworm}
VENV=$(realpath -m "${VENV:-.venv}")
ASSETS=$(realpath -m "${EDGE3DFA_ASSETS:-../shared/assets}")
STATE=$ROOT/.edge3dfa-pi-check  # stamps of the finished stages, kept inside the root they describe
RVENV=/opt/edge3dfa             # the virtual environment inside the root
HOST_CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
ART=$OUT/artifacts
BART=$ART/bundle                # the phone bundles, apart: validate "$ART/mb05" scores the params artifacts only
export EDGE3DFA_ASSETS=$ASSETS
export ROOT OUT SAMPLES CROPS CPUS MIRROR SUITE VENV ASSETS STATE RVENV HOST_CA ART BART REPO
export PI_CHECK_T0=${PI_CHECK_T0:-$(date +%s)}  # the start, shared with the re-executed emulated half

log() { printf '[pi-check %4ds] %s\n' $(($(date +%s) - PI_CHECK_T0)) "$*" >&2; }
die() { log "error: $*"; exit 2; }
timing() { echo "$1 $2" >> "$OUT/.timings"; }  # stage name, seconds

# The same commands on every side: $1 = x86 | arm64-CPU; the photo runs, then the subset evaluation.
run_side() {
    local side=$1 edge py
    if [[ $side == x86 ]]; then edge=("$VENV/bin/edge3dfa"); py=("$VENV/bin/python")
    else edge=(in_root "$RVENV/bin/edge3dfa"); py=(in_root "$RVENV/bin/python"); fi
    local dir=$OUT/$side photos=$PHOTOS det=$ART/faceboxes/tflite/faceboxes_fp32.tflite
    local bdet=$BART/faceboxes/tflite/faceboxes_fp32_bundle.tflite
    # --verbose: LiteRT's XNNPACK banner goes to stderr (else to the third-party log), where pi_compare.py looks
    rm -rf "$dir" && mkdir -p "$dir"
    for p in fp32 int8; do
        log "$side: edge3dfa run, mb05 $p tflite, $photos; landmarks of $CROPS crops"
        "${edge[@]}" --verbose run --artifact "$ART/mb05/tflite/mb05_$p.tflite" --detector "$det" --threads 1 \
            --out-dir "$dir/run-$p" "$photos" 2> "$dir/run-$p.log" || { cat "$dir/run-$p.log"; return 1; }
        grep -h 'face(s)' "$dir/run-$p.log" | sed 's/^/    /' >&2
        "${py[@]}" "$REPO/scripts/pi_landmarks.py" --artifact "$ART/mb05/tflite/mb05_$p.tflite" --detector "$det" \
            --crops "$CROPS" --threads 1 --out "$dir/landmarks-$p.json" "$photos" 2> "$dir/landmarks-$p.log" \
            || { cat "$dir/landmarks-$p.log"; return 1; }
        log "$side: edge3dfa run, mb05 $p tflite bundle + faceboxes bundle, $photos"
        "${edge[@]}" --verbose run --artifact "$BART/mb05/tflite/mb05_${p}_bundle.tflite" --detector "$bdet" --threads 1 \
            --out-dir "$dir/run-bundle-$p" "$photos" 2> "$dir/run-bundle-$p.log" || { cat "$dir/run-bundle-$p.log"; return 1; }
        grep -h 'face(s)' "$dir/run-bundle-$p.log" | sed 's/^/    /' >&2
    done
    log "$side: TFLite bundles vs the spec on $CROPS crops; the detector bundle vs decode + NMS on $photos"
    "${py[@]}" "$REPO/scripts/pi_bundles.py" --bundle "fp32=$BART/mb05/tflite/mb05_fp32_bundle.tflite" \
        --bundle "int8=$BART/mb05/tflite/mb05_int8_bundle.tflite" \
        --params-artifact "fp32=$ART/mb05/tflite/mb05_fp32.tflite" --params-artifact "int8=$ART/mb05/tflite/mb05_int8.tflite" \
        --detector-bundle "$bdet" --detector "$det" --crops "$CROPS" --threads 1 --out "$dir/bundles.json" "$photos" \
        2> "$dir/bundles.log" || { cat "$dir/bundles.log"; return 1; }
    log "$side: edge3dfa validate, $SAMPLES AFLW2000-3D crops, fp32 and int8"
    "${edge[@]}" validate "$ART/mb05" --reference none --samples "$SAMPLES" --latency-runs 0 \
        --threads 1 --report-dir "$dir/validate" > "$dir/validate.log" 2>&1 || { tail -20 "$dir/validate.log"; return 1; }
}

# ------------------------------------------------------------------ emulated side (own mount namespace)

in_root() {  # a command in the root, on the emulated CPU $QEMU_CPU (qemu reads it from every process's environment)
    local env=(HOME=/root PATH="$RVENV/bin:/usr/bin:/bin" LANG=C.UTF-8 EDGE3DFA_ASSETS="$ASSETS" QEMU_CPU="$QEMU_CPU"
               PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1
               PIP_NO_CACHE_DIR=1)
    local v
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -n ${!v:-} ]] && env+=("$v=${!v}")
    done
    QEMU_CPU=$QEMU_CPU chroot "$ROOT" /usr/bin/env -i "${env[@]}" "$@"
}

mounted_under() { awk -v r="$1/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts; }

build_root() {
    if [[ -f $STATE/root.done ]]; then log "arm64 root: cached, $ROOT"; return; fi
    local t0=$SECONDS
    if [[ -e $ROOT ]]; then
        [[ -z $(mounted_under "$ROOT") ]] || die "something is mounted under $ROOT; unmount it first"
        log "removing the unfinished root $ROOT"
        rm -rf --one-file-system "$ROOT"
    fi
    mkdir -p "$(dirname "$ROOT")"
    log "arm64 root: debootstrap $SUITE (minbase + python3) from $MIRROR into $ROOT (~6 min)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv "$SUITE" "$ROOT" "$MIRROR" \
        > "$OUT/debootstrap.log" 2>&1 || { tail -20 "$OUT/debootstrap.log"; die "debootstrap failed (log: $OUT/debootstrap.log)"; }
    mkdir -p "$STATE" && touch "$STATE/root.done"
    timing debootstrap $((SECONDS - t0))
}

# /proc/cpuinfo of a Raspberry Pi with the given core, one entry per host CPU (XNNPACK's cpuinfo wants both to agree)
pi_cpuinfo() {
    local part variant revision features n
    case $1 in
        cortex-a53) part=0xd03 variant=0x0 revision=4 features="fp asimd evtstrm crc32 cpuid" ;;  # Pi 3, Zero 2 W
        cortex-a72) part=0xd08 variant=0x0 revision=3 features="fp asimd evtstrm crc32 cpuid" ;;  # Pi 4, Pi 400, CM4
        cortex-a76) part=0xd0b variant=0x4 revision=1  # Pi 5
                    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "no Raspberry Pi /proc/cpuinfo for CPU $1 (PI_CPUS takes cortex-a53, cortex-a72, cortex-a76)" ;;
    esac
    for ((n = 0; n < $(getconf _NPROCESSORS_CONF); n++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$n" "$features"
        printf 'CPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
    done
}

MOUNTS=()
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"; done
    MOUNTS=()
}
bind() {  # bind SRC at the same path inside the root; "ro" as $2 makes it read-only
    mkdir -p "$ROOT$1"
    mount --bind "$1" "$ROOT$1" && MOUNTS+=("$ROOT$1")
    [[ ${2:-} != ro ]] || mount -o remount,bind,ro "$ROOT$1"
}

install_root() {
    local t0=$SECONDS wheel key
    wheel=$(ls "$OUT"/wheel/edge3dfa-*.whl)
    install -D -m 644 "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca.crt"  # pip reaches the index through the host's CAs
    key=$(cat "$OUT/pins.txt" "$OUT/wheel/requires.txt" | sha256sum | cut -c1-16)
    if [[ ! -f $STATE/venv-$key.done ]]; then
        log "arm64 root: python3 -m venv $RVENV; pip install edge3dfa[pi] ($(tr '\n' ' ' < "$OUT/pins.txt"))"
        rm -f "$STATE"/venv-*.done && rm -rf "${ROOT:?}$RVENV"
        in_root python3 -m venv "$RVENV"
        in_root "$RVENV/bin/pip" install -q -c "$OUT/pins.txt" "$wheel[pi]"
        touch "$STATE/venv-$key.done"
        timing venv $((SECONDS - t0))
    else
        log "arm64 root: cached venv $RVENV (deps $key); reinstalling the edge3dfa wheel"
        in_root "$RVENV/bin/pip" install -q --no-deps --force-reinstall "$wheel"
    fi
    log "arm64 root: import edge3dfa.runtime and the TFLite target without torch or tensorflow"
    in_root "$RVENV/bin/python" -c '
import importlib.util, platform, sys
assert platform.machine() == "aarch64", platform.machine()
bad = [m for m in ("torch", "tensorflow") if importlib.util.find_spec(m) is not None]
assert not bad, f"importable in the pi root: {bad}"
import edge3dfa.runtime, edge3dfa.targets.tflite, edge3dfa.pipeline  # noqa: E401
assert not {"torch", "tensorflow"} & set(sys.modules)
print("  ", platform.machine(), "python", platform.python_version(), "edge3dfa", edge3dfa.__version__, "ok")'
    timing install $((SECONDS - t0))
}

emulated() {
    local cpu t0
    for cpu in $CPUS; do pi_cpuinfo "$cpu" > "$OUT/cpuinfo-$cpu"; done
    build_root
    trap unmount_all EXIT
    mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
    mount --bind /dev "$ROOT/dev" && MOUNTS+=("$ROOT/dev")
    mount --bind /sys "$ROOT/sys" && MOUNTS+=("$ROOT/sys") && mount -o remount,bind,ro "$ROOT/sys"
    bind "$ASSETS" ro
    bind "$REPO/scripts" ro
    bind "$OUT"
    export QEMU_CPU=${CPUS%% *}
    install_root
    for cpu in $CPUS; do
        t0=$SECONDS
        mount --bind "$OUT/cpuinfo-$cpu" "$ROOT/proc/cpuinfo" && MOUNTS+=("$ROOT/proc/cpuinfo")
        QEMU_CPU=$cpu run_side "arm64-$cpu"
        umount "$ROOT/proc/cpuinfo" && unset 'MOUNTS[${#MOUNTS[@]}-1]'
        timing "arm64_${cpu}_runs" $((SECONDS - t0))
    done
    unmount_all
}

if [[ ${1:-} == __emulated ]]; then emulated; exit 0; fi

# ------------------------------------------------------------------ host side

host_tools() {
    [[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot, mount): run it as root"
    local missing=()
    command -v debootstrap > /dev/null || missing+=(debootstrap)
    command -v qemu-aarch64-static > /dev/null || missing+=(qemu-user-static)
    command -v update-binfmts > /dev/null || missing+=(binfmt-support)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} from Debian's packages"
        apt-get install -y -q "${missing[@]}" > /dev/null || { apt-get update -q > /dev/null && apt-get install -y -q "${missing[@]}" > /dev/null; }
    fi
    local handler=/proc/sys/fs/binfmt_misc/qemu-aarch64
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    grep -qx enabled "$handler" 2> /dev/null || update-binfmts --enable qemu-aarch64
    grep -qx enabled "$handler" 2> /dev/null || die "the qemu-aarch64 binfmt handler is not enabled ($handler)"
    grep -q '^flags:.*F' "$handler" || die "the qemu-aarch64 binfmt handler lacks the F flag a chroot needs"
    [[ -x $VENV/bin/edge3dfa ]] || die "no $VENV/bin/edge3dfa: run make $VENV/.installed first"
    [[ -d $ASSETS ]] || die "assets folder not found: $ASSETS (set EDGE3DFA_ASSETS)"
}

x86_prepare() {
    local t0=$SECONDS
    mkdir -p "$OUT" && rm -f "$OUT/.timings" "$OUT/result.json"
    if [[ ${PI_RECONVERT:-0} == 1 || ! -f $ART/mb05/tflite/mb05_int8.json || ! -f $ART/mb05/tflite/mb05_fp32.json \
          || ! -f $ART/faceboxes/tflite/faceboxes_fp32.json || ! -f $BART/mb05/tflite/mb05_fp32_bundle.json \
          || ! -f $BART/mb05/tflite/mb05_int8_bundle.json || ! -f $BART/faceboxes/tflite/faceboxes_fp32_bundle.json ]]; then
        log "x86: converting mb05 (tflite fp32, int8) and faceboxes (tflite fp32) into $ART, bundles into $BART"
        rm -rf "$ART"
        "$VENV/bin/edge3dfa" convert --model mb05 --to tflite --precision fp32,int8 --out "$ART" > "$OUT/convert.log" 2>&1 \
            || { tail -20 "$OUT/convert.log"; die "conversion failed"; }
        "$VENV/bin/edge3dfa" convert --model faceboxes --to tflite --precision fp32 --out "$ART" >> "$OUT/convert.log" 2>&1 \
            || { tail -20 "$OUT/convert.log"; die "conversion failed"; }
        "$VENV/bin/edge3dfa" convert --model mb05 --to tflite --precision fp32,int8 --bundle --out "$BART" \
            >> "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; die "bundle conversion failed"; }
        "$VENV/bin/edge3dfa" convert --model faceboxes --to tflite --precision fp32 --bundle --out "$BART" \
            >> "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; die "bundle conversion failed"; }
        timing convert $((SECONDS - t0))
    else
        log "x86: reusing the artifacts in $ART (PI_RECONVERT=1 converts again)"
    fi
    PHOTOS=$("$VENV/bin/python" -c 'from edge3dfa import assets; print(assets.fetch("emma").parent)')
    export PHOTOS  # the example photos of the assets (3DDFA_V2 examples/inputs)
    log "x86: building the edge3dfa wheel"
    rm -rf "$OUT/wheel"
    "$VENV/bin/python" -m pip wheel -q --no-deps -w "$OUT/wheel" "$REPO" > "$OUT/wheel.log" 2>&1 \
        || { tail -20 "$OUT/wheel.log"; die "pip wheel failed"; }
    # what the wheel requires and which versions the x86 side runs: together they key the root's venv
    "$VENV/bin/python" - "$OUT" "${PI_PIN:-1}" <<'EOF'
import sys, zipfile
from importlib.metadata import version
from pathlib import Path
out, pin = Path(sys.argv[1]), sys.argv[2] == "1"
wheel = next((out / "wheel").glob("edge3dfa-*.whl"))
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
(out / "wheel" / "requires.txt").write_text("".join(f"{ln}\n" for ln in meta.splitlines() if ln.startswith("Requires-Dist")))
pins = [f"{p}=={version(p)}\n" for p in ("numpy", "opencv-python-headless", "ai-edge-litert")] if pin else []
(out / "pins.txt").write_text("".join(pins))
EOF
    timing x86_prepare $((SECONDS - t0))
}

main() {
    host_tools
    x86_prepare
    local t0=$SECONDS
    run_side x86
    timing x86_runs $((SECONDS - t0))
    unshare --mount --propagation private "$0" __emulated
    local size
    size=$(du -sm --one-file-system "$ROOT" | cut -f1)
    log "arm64 root: $ROOT, $size MB"
    timing total $(($(date +%s) - PI_CHECK_T0))
    "$VENV/bin/python" - "$OUT" "$ROOT" "$size" "$SAMPLES" "$CPUS" <<'EOF'
import json, sys
from pathlib import Path
out, root, size, samples = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
timing = {}
for line in (out / ".timings").read_text().splitlines():
    name, sec = line.split()
    timing[f"{name}_s"] = int(sec)
extra = {"root": {"path": root, "size_mb": size, "built_this_run": "debootstrap_s" in timing},
         "samples": samples, "timing": timing, "emulated_cpus": sys.argv[5].split(),
         "note": "latency under qemu-user emulation says nothing about a Raspberry Pi and is not measured"}
(out / "extra.json").write_text(json.dumps(extra, indent=2) + "\n")
EOF
    local rc=0 cpu arms=()
    for cpu in $CPUS; do arms+=(--arm64 "$cpu=$OUT/arm64-$cpu"); done
    "$VENV/bin/python" "$REPO/scripts/pi_compare.py" --x86 "$OUT/x86" "${arms[@]}" --extra "$OUT/extra.json" \
        --out "$OUT/result.json" || rc=$?
    log "result: $OUT/result.json; root $size MB; $(tr '\n' ' ' < "$OUT/.timings")(seconds)"
    exit $rc
}

main "$@"
