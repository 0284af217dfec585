#!/usr/bin/env bash
# The CUDA check in one call, for a GPU machine without a Rust toolchain or internet.
#
#   OUT=/some/dir scripts/gpu/check.sh            # on the GPU machine, from the repository root
#   OUT=/some/dir scripts/gpu/check.sh --dry-run  # anywhere: CPU, tiny shapes (the tests run this)
#
# The binary: $CUSA_PIPE if set, else target/gpu/cusa-pipe.xz (a stripped `--features cuda`
# build, xz-compressed; unpacked with Python's lzma, no xz needed; not in the dry run), else
# target/debug/cusa-pipe.
# Every part runs under its own timeout and leaves its JSON and log in $OUT even when it fails
# or is killed; after a burn part dies (killed, crashed) the remaining burn parts are skipped
# (they would hang the same way; parity-f64 excepted, whose f64 kernels no other part runs) but
# the PyTorch peer still runs. Each timed configuration
# runs once in burn, then in PyTorch, each in its own process, while nvidia-smi samples the GPU's
# memory. At the end
# scripts/gpu/summarize.py merges everything into $OUT/gpu-check.json and prints the table.
#
# Settings (environment): BUDGET (s, whole check; 450), PART_T / STEP_T / TORCH_T (s, per part),
# STEPS / WARMUP (timed / untimed steps), PARALLEL=1 (parity, parity-f64, train and the fp32 base
# step side by side: cold-start kernel compilation is single-core per process), PACK=1 (archives instead of
# loose files), WORK (where the parts run and CubeCL keeps its caches), TORCH=0 (no peer),
# PYTHON (with torch + transformers for the peer), CUBECL_AUTOTUNE_LEVEL (CubeCL's own).
#
# What three H200 leases taught (README, "On a GPU"): a cold start compiles about one kernel per
# second per process, so give parity and train ~300 s each, or start from a kept cache.
#
# CUDA libraries: burn 0.21's CUDA runtime (cudarc, built for CUDA 13) dlopens libcuda.so.1 from
# the driver and libnvrtc.so.13 (NVRTC compiles every kernel); PyTorch's pip wheels ship NVRTC
# under site-packages/nvidia/*/lib, which this script puts on LD_LIBRARY_PATH.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/target/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cd "$ROOT"
START=$(date +%s)
# The whole check ends within BUDGET seconds: a part gets at most what is left (minus the
# summary's few seconds) and is skipped when under 15 s remain.
BUDGET=${BUDGET:-450}
left() { echo $(( BUDGET - 8 - ($(date +%s) - START) )); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
log() { echo "[check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/check.log"; }

BIN=${CUSA_PIPE:-}
if [ -z "$BIN" ] && [ $DRY = 0 ] && [ -f target/gpu/cusa-pipe.xz ]; then
  BIN=/tmp/cusa-pipe-check
  "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    target/gpu/cusa-pipe.xz "$BIN" && chmod +x "$BIN" || { log "could not unpack target/gpu/cusa-pipe.xz"; exit 2; }
fi
[ -z "$BIN" ] && BIN=$ROOT/target/debug/cusa-pipe
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || { log "no cusa-pipe binary at $BIN (build one, or set CUSA_PIPE)"; exit 2; }

if [ $DRY = 1 ]; then
  DEVICE=cpu; CLIP=tiny; BATCH=16; STEPS=3; WARMUP=1; TEXT=14; PRECISIONS="fp32"
  PART_T=300; STEP_T=300
else
  DEVICE=cuda; CLIP=ViT-B-32; BATCH=128; STEPS=${STEPS:-20}; WARMUP=${WARMUP:-3}; TEXT=77
  PRECISIONS="fp32 bf16-mixed"; PART_T=${PART_T:-75}; STEP_T=${STEP_T:-100}
  # NVRTC and friends from PyTorch's wheels; the driver's libcuda is already on the loader path.
  LIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
dirs = set()
for s in site.getsitepackages():
    for f in glob.glob(s + "/nvidia/**/lib*.so*", recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  { nvidia-smi; echo; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH";
    for d in ${LIBS//:/ }; do ls "$d"; done | grep -E "nvrtc|cudart|nvJitLink" | sort -u; } > "$OUT/device.txt" 2>&1
fi
log "binary $BIN, device $DEVICE, clip $CLIP, batch $BATCH"

# The parts run in $OUT/work/<part>. CubeCL (burn's GPU compiler) reads cubecl.toml from there:
# its kernel and autotune caches in that folder, and what it compiles and tunes logged to
# $OUT/<part>.cubecl-*.log.
WORK=${WORK:-$OUT/work}
mkdir -p "$WORK"
# A kept cache (a PACK=1 run's cubecl-caches.tar.gz, copied to target/gpu/ beside the binary
# it was made with) spares the next lease the cold start's compilation.
if [ $DRY = 0 ] && [ -f target/gpu/cubecl-caches.tar.gz ]; then
  tar -xzf target/gpu/cubecl-caches.tar.gz -C "$WORK" && log "CubeCL caches from target/gpu/cubecl-caches.tar.gz"
fi
cubecl_toml() {
  cat > "$WORK/$1/cubecl.toml" <<EOF
[compilation]
cache = "local"
[compilation.logger]
level = "basic"
file = "$OUT/$1.cubecl-compilation.log"
[autotune]
cache = "local"
[autotune.logger]
level = "minimal"
file = "$OUT/$1.cubecl-autotune.log"
EOF
}

BURN_DEAD=0
# sample NAME: records the GPU's used memory every 100 ms (nvidia-smi, context included) into
# $OUT/NAME.mem until `unsample`; the summary reports the peak above the idle baseline.
SAMPLER=
sample() {
  command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$1.mem" 2>/dev/null &
  SAMPLER=$!
}
unsample() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=; }

# part NAME TIMEOUT ARGS...: one run of `bench gpu`, its log and JSON in $OUT.
part() {
  local name=$1 t=$2; shift 2
  if [ $BURN_DEAD = 1 ]; then
    log "$name: skipped (an earlier burn part died)"
    echo "{\"part\": \"$name\", \"rc\": null, \"skipped\": true}" > "$OUT/$name.rc.json"
    return 0
  fi
  t=$(cap "$t")
  if [ "$t" -lt 15 ]; then
    log "$name: skipped (the check's budget is spent)"
    echo "{\"part\": \"$name\", \"rc\": null, \"skipped\": true}" > "$OUT/$name.rc.json"
    return 0
  fi
  log "$name: start (timeout ${t}s)"
  sample "$name"
  mkdir -p "$WORK/$name"
  cubecl_toml "$name"
  (cd "$WORK/$name" && RUST_BACKTRACE=1 timeout -k 5 "$t" "$BIN" bench gpu --device "$DEVICE" \
    --dir "$OUT/scratch" --fixtures "$ROOT/tests/fixtures" --json "$OUT/$name.json" "$@") \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  unsample
  log "$name: rc=$rc"
  echo "{\"part\": \"$name\", \"rc\": $rc}" > "$OUT/$name.rc.json"
  tail -n 12 "$OUT/$name.log"
  # 0 passed, 1 a figure out of bounds: the device works; anything else: it died. parity-f64
  # runs f64 kernels no other part uses: its death says nothing about them.
  [ $rc -gt 1 ] && [ "$name" != parity-f64 ] && BURN_DEAD=1
  return 0
}

# peer NAME PRECISION LOSS: the PyTorch step of the same configuration.
peer() {
  local name=$1 p=$2 l=$3
  if [ "${TORCH:-1}" = 0 ]; then log "$name: skipped (TORCH=0)"; return 0; fi
  local args=(--clip "$CLIP" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --text-len "$TEXT"
    --precision "$p" --loss "$l" --json "$OUT/$name.json")
  [ $DRY = 1 ] && args+=(--device cpu)
  # burn's CUDA f32 takes its products in TF32 (README, "On a GPU"): the peer's fp32 does too.
  [ "$p" = fp32 ] && args+=(--tf32)
  local t
  t=$(cap "${TORCH_T:-60}")
  if [ "$t" -lt 15 ]; then log "$name: skipped (the check's budget is spent)"; return 0; fi
  log "$name: start (timeout ${t}s)"
  sample "$name"
  timeout -k 5 "$t" "$PY" scripts/bench/clip_step_torch.py "${args[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  unsample
  log "$name: rc=$rc"
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$OUT/idle.mem" 2>/dev/null
STEP_ARGS=(--part step --clip "$CLIP" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --text-len "$TEXT")
if [ "${PARALLEL:-0}" = 1 ]; then
  # Kernel compilation (NVRTC, one CPU core per process) dominates a cold start: both parities,
  # the short training and the fp32 base step run side by side, each compiling on its own core.
  # Peak memory is then the GPU's total; the tiny parts use little of it.
  part parity "$PART_T" --part parity --precision "${PRECISIONS##* }" &
  part parity-f64 "$PART_T" --part parity-f64 --precision fp32 &
  part train "$PART_T" --part train --precision fp32 &
  part step-fp32-base "$STEP_T" "${STEP_ARGS[@]}" --precision fp32 --loss base &
  wait
  peer torch-fp32-base fp32 base
else
part parity "$PART_T" --part parity --precision "${PRECISIONS##* }"
part parity-f64 "$PART_T" --part parity-f64 --precision fp32
part train "$PART_T" --part train --precision fp32
for l in base cusa; do
  for p in $PRECISIONS; do
    part "step-$p-$l" "$STEP_T" "${STEP_ARGS[@]}" --precision "$p" --loss "$l"
    peer "torch-$p-$l" "$p" "$l"
  done
done
fi

"$PY" scripts/gpu/summarize.py "$OUT"
RC=$?

# A GPU lease brings back only a few files: with PACK=1 the parts' files go into one archive,
# and CubeCL's kernel and autotune caches into another (for a later lease to start warm).
if [ "${PACK:-0}" = 1 ]; then
  tar -czf "$OUT/cubecl-caches.tar.gz" -C "$WORK" . 2>/dev/null
  cd "$OUT" || exit 2
  find . -maxdepth 1 -type f ! -name '*.tar.gz' ! -name gpu-check.json ! -name check.log -print0 |
    tar -czf parts.tar.gz --null -T - &&
    find . -maxdepth 1 -type f ! -name '*.tar.gz' ! -name gpu-check.json ! -name check.log -delete
  rm -rf scratch
fi
exit $RC
