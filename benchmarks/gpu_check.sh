#!/usr/bin/env bash
# One prepared GPU check (docs/design.md "Testing without a GPU"): validates and times everything
# GPU-specific in one call of under 8 minutes on one H100/H200 (the step limits of each profile add
# up to 450 s at most; tests/test_gpu_check.py keeps them there), writing one JSON file per step to OUTDIR.
#
#   export PYTHONPATH=DIR:$PWD   # DIR: where DALI is installed, if not in the environment (on a
#                                 # machine without a registry, `pip install --target DIR` of a copied wheel)
#   bash benchmarks/gpu_check.sh OUTDIR [all|perf]
#   GPU_CHECK_EXTRAS=extras.tar.xz bash benchmarks/gpu_check.sh OUTDIR perf   # opencv-contrib carried in
#                                 # (benchmarks/pack_extras.py), for the OpenCV rows on a machine without it
#
# Profiles: `all` (the default) runs every step. `perf` runs only the training step and flow
# extraction (issues 11 and 12) with the seconds the loader steps would take given to them: more
# rows (the CUDA-graph step in every variant, both compiled rows, the flow workers per GPU). It
# needs no DALI; the OpenCV flow row (the ratio and the EPE against OpenCV) needs opencv-contrib
# there, and without it records its error while the GPU rows stay.
#
# Every step fails soft: a failure or timeout is recorded as {"error": ...} in its JSON file and
# the script goes on. Without a CUDA device the steps run in DALI's CPU-only mode at smoke size
# (that is how CI and developer machines check that this script and its python still work).
# Later issues add their steps before the last one, each with its own budget; a new step takes its
# seconds from the others, so the limits keep adding up to 450 s at most. The last step (the
# compiled training step, whose compile may take minutes) gets its limit or what the others left
# of the 450 s, whichever is more.
# GPU_CHECK_DRY_RUN=1 lists the steps and their limits without running them (GPU_CHECK_DEVICE=cuda
# lists the GPU form on any machine).
set -u
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR [all|perf]}
PROFILE=${2:-all}
case $PROFILE in all|perf) ;; *) echo "gpu_check.sh: profile must be all or perf, got '$PROFILE'" >&2; exit 2;; esac
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)  # absolute: the steps run from the repository root
if [ -n "${GPU_CHECK_EXTRAS:-}" ] && [ ! -f "$GPU_CHECK_EXTRAS" ]; then
  echo "gpu_check.sh: GPU_CHECK_EXTRAS=$GPU_CHECK_EXTRAS does not exist (write it with benchmarks/pack_extras.py)" >&2
  exit 2
fi
EXTRAS=${GPU_CHECK_EXTRAS:+$(realpath "$GPU_CHECK_EXTRAS")}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python >/dev/null; then PY=python
else PY=python3  # a machine with python3 only
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

# GPU_CHECK_EXTRAS: a tarball of unpacked wheels (benchmarks/pack_extras.py) for a machine that
# reaches no registry, unpacked to a temporary folder that goes first on PYTHONPATH (contrib's cv2
# before a plain one) and is removed when the check ends
if [ -n "$EXTRAS" ]; then
  EXTRAS_DIR=$(mktemp -d)
  trap 'rm -rf "$EXTRAS_DIR"' EXIT
  if ! $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
       "$EXTRAS" "$EXTRAS_DIR" || [ ! -d "$EXTRAS_DIR/site" ]; then
    echo "gpu_check.sh: GPU_CHECK_EXTRAS=$GPU_CHECK_EXTRAS is not a tarball of site/ as benchmarks/pack_extras.py writes" >&2
    exit 2
  fi
  export PYTHONPATH="$EXTRAS_DIR/site:$PYTHONPATH"
  echo "== extras from $EXTRAS: $($PY -c "
import cv2
print('OpenCV', cv2.__version__, 'with contrib' if hasattr(cv2, 'optflow') else 'WITHOUT contrib')" 2>&1 | tail -1)"
fi

if [ -n "${GPU_CHECK_DEVICE:-}" ]; then
  DEVICE=$GPU_CHECK_DEVICE
elif $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  DEVICE=cuda
else
  DEVICE=cpu
fi
if [ $DEVICE = cuda ]; then
  SIZE=240x320; FRAMES=16; CROP=112; BATCH=16; STEPS=10; SPEED=(--batch 16 --frames 32 --crop 128 --steps 15 --workers 8 --threads 4)
else
  SIZE=24x32; FRAMES=8; CROP=16; BATCH=2; STEPS=2
  SPEED=(--batch 2 --frames 8 --crop 16 --segments 2 --steps 2 --warmup 1 --gen-size 24x32 --workers 0 --threads 1)
fi

BUDGET=450  # seconds on a GPU that the step limits of a profile add up to at most
START=$SECONDS
# left_of_budget NOMINAL: the GPU seconds the steps so far left of BUDGET, at least NOMINAL (its
# limit in the dry run, which runs nothing)
left_of_budget() {
  local scale=1; [ $DEVICE = cpu ] && scale=3  # step() gives the CPU 3x each limit
  local left=$(( BUDGET - (SECONDS - START) / scale ))
  if [ "$DRY" = 1 ] || [ $left -lt $1 ]; then echo $1; else echo $left; fi
}

# step NAME SECONDS CMD...: run CMD with a time limit; if it fails and left no OUTDIR/NAME.json,
# write one holding the exit status and the tail of its log.
step() {
  local name=$1 limit=$2; shift 2
  # the limits are sized for the GPU; the CPU smoke run on a loaded 2-core machine gets 3x as long
  [ $DEVICE = cpu ] && limit=$((limit * 3))
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if [ "$DRY" = 1 ]; then echo "   $*"; return; fi
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "   failed rc=$rc after $((SECONDS - start))s (see $OUTDIR/$name.log)"
    if [ ! -s "$OUTDIR/$name.json" ] || ! grep -q '"error"' "$OUTDIR/$name.json"; then
      $PY - "$OUTDIR/$name.json" "$rc" "$OUTDIR/$name.log" <<'PYEOF'
import json, sys
path, rc, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], errors="replace").read()
json.dump({"error": f"exit status {rc}" + (" (timed out)" if rc in (124, 137) else ""), "log_tail": log[-3000:]},
          open(path, "w"), indent=1)
PYEOF
    fi
  else
    echo "   ok in $((SECONDS - start))s"
  fi
}

step environment 15 $PY -c "
import json, platform, sys, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.cuda.is_available(),
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}
try:
    import nvidia.dali as dali; info['dali'] = dali.__version__
except ImportError as err:  # the perf profile runs without DALI
    info['dali'] = None
    if '$PROFILE' == 'all': info['error'] = f'DALI not importable: {err}'
try:  # the OpenCV rows of flow_speed need contrib (cv2.optflow): GPU_CHECK_EXTRAS carries it in
    import cv2; info['opencv'] = cv2.__version__; info['opencv_contrib'] = hasattr(cv2, 'optflow')
except ImportError:
    info['opencv'] = None
json.dump(info, open('$OUTDIR/environment.json', 'w'), indent=1); print(info)
"

if [ $PROFILE = all ]; then
# --- issue 3: loader ---------------------------------------------------------------------------
step loader_parity 35 $PY benchmarks/gpu_loader_check.py parity "$OUTDIR/loader_parity.json" \
  --device $DEVICE --size $SIZE --frames $FRAMES --crop $CROP
step hw_decoder_sweep 45 $PY benchmarks/gpu_loader_check.py decoder-sweep "$OUTDIR/hw_decoder_sweep.json" \
  --device $DEVICE --size $SIZE --frames $FRAMES --crop $CROP --batch $BATCH --steps $STEPS \
  --loads $([ $DEVICE = cpu ] && echo 0.65 || echo 0,0.5,1)
step loader_speed 45 $PY benchmarks/loader_speed.py --device $DEVICE "${SPEED[@]}" --json "$OUTDIR/loader_speed.json"

# --- issue 5: the whole schedule at smoke size (stage 2 on the device, autocast, dihedral copies) ---
# first of the training steps: a correctness check (stage-2 paths that CPU tests cannot reach)
step schedule 70 $PY benchmarks/schedule_check.py --device $DEVICE --json "$OUTDIR/schedule.json"
fi

# --- issues 4 and 11: the training step -----------------------------------------------------------
# The old eager step (legacy, fp32) is the baseline row; each variant spends ~30 s in cuDNN's
# autotune on an H100 (2026-11-26) unless an earlier row had its dtype, layout and batch (bf16 and
# bf16+calls after bf16+graph), and --profile adds kernels, GPU busy fraction, launches per step,
# cuDNN version. `+graph` is the eager step captured as one CUDA graph (seconds, no compiler),
# `+calls` each encoder call as its own graphs (what torchrun runs). The JSON is written after
# every row and a timeout keeps those done, so the rows run in the order they are needed, the
# ones that only pick defaults (channels_last_3d, batch 64: an autotune each) last.
if [ $DEVICE = cuda ] && [ $PROFILE = all ]; then
  TRAIN=(--batch 16 --steps 8 --warmup 2 --variants legacy,bf16+graph,cotrain+graph,bf16 --profile); TRAIN_S=120
  COMPILED=(--variants bf16+step); COMPILED_S=60
elif [ $DEVICE = cuda ]; then
  TRAIN=(--batch 16 --steps 8 --warmup 2 --profile
         --variants legacy,bf16+graph,cotrain+graph,bf16,bf16+calls,channels_last+graph,batch64+graph); TRAIN_S=175
  COMPILED=(--variants bf16+step,cotrain+step); COMPILED_S=110
else
  TRAIN=(--smoke --variants legacy,fp32,fp32+graph,channels_last,batch64,cotrain --profile); TRAIN_S=120
fi
step train_speed $TRAIN_S $PY benchmarks/train_speed.py --device $DEVICE "${TRAIN[@]}" --json "$OUTDIR/train_speed.json"
# --- issues 7, 12: flow extraction (OpenCV TV-L1 vs tvl1-torch's fast path on the GPU, with and without cuts) ---
if [ $DEVICE = cuda ] && [ $PROFILE = all ]; then
  # the fast path first (its inductor warm-up is most of the step, and its row is written when done),
  # then one OpenCV process (the ratio and the EPE), then the rest; 2 OpenCV pairs; CPU-only rows (pool, torch on CPU) and eager CUDA (6.7 pairs/s,
  # issue 7) are measured off the GPU budget
  FLOW=(--sizes 240x320 --cpu-pairs 2 --gpu-pairs 144 --compile cuda --skip pool,torch-cpu,eager-cuda); FLOW_S=60
elif [ $DEVICE = cuda ]; then
  # perf: 9 OpenCV pairs (one spans a cut), 256 GPU pairs, 2 flow workers sharing the GPU, and a
  # profile of one batch per mix and row (seconds)
  FLOW=(--sizes 240x320 --cpu-pairs 9 --gpu-pairs 256 --compile cuda --skip pool,torch-cpu,eager-cuda
        --gpu-processes 2 --profile); FLOW_S=150
else
  FLOW=(--sizes 32x40 --cpu-pairs 2 --pool-pairs 2 --workers 1); FLOW_S=60
fi
step flow_speed $FLOW_S $PY benchmarks/flow_speed.py "${FLOW[@]}" --json "$OUTDIR/flow_speed.json"

# --- later issues: add steps here; the step limits together must stay at or under 450 s -----------

# --- issue 11, last: the compiled step (torch.compile + CUDA graphs) ------------------------------
# Compiling S3D's training step takes minutes (about 4 on the 2-core CPU, 2026-12-05), then 20
# steps; a row is written as soon as it is timed, so a time limit leaves "incomplete" with what
# was measured. Last, with what the other steps left of the budget. Inductor on a 2-core CPU takes
# minutes: on the CPU this step only records that it was skipped.
if [ $DEVICE = cuda ]; then
  step train_speed_compiled "$(left_of_budget $COMPILED_S)" $PY benchmarks/train_speed.py --device cuda --batch 16 \
    --steps 20 --warmup 5 "${COMPILED[@]}" --json "$OUTDIR/train_speed_compiled.json"
else
  step train_speed_compiled "$(left_of_budget 10)" $PY -c "import json; json.dump({'skipped': 'compiled rows run on CUDA only'}, open('$OUTDIR/train_speed_compiled.json', 'w'))"
fi

[ "$DRY" = 1 ] && exit 0
# the measurements against the targets (PASS / FAIL / MISSING per target), also as targets.json
$PY benchmarks/gpu_targets.py "$OUTDIR" --json "$OUTDIR/targets.json" || echo "   gpu_targets failed (see above)"
echo "results in $OUTDIR: $(ls "$OUTDIR"/*.json | xargs -n1 basename | tr '\n' ' ')"
