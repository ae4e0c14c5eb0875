#!/usr/bin/env bash
# GPU readiness in one call: on a machine with a GPU, in under 8 minutes,
#   1. the engine bench on the GPU (real CIFAR-10 test arrays from ../shared/data/cifar10, width 1.0),
#   2. bf16 against fp32 at a few points (tolerance and why: scripts/gpu_check.py, BF16_TOLERANCE),
#   3. a small sweep with gpus_per_trial: auto, showing four trials sharing the GPU;
# prints the figures and exits non-zero if any step failed.
#
#   scripts/gpu_check.sh [--dry] [--out DIR] [--data DIR]
#
# --dry runs every step on the CPU, tiny (width 0.125, a few hundred images): the same code paths, for a machine
# without a GPU (tests/test_gpu_check.py runs it). Each step's log and figures are in DIR (default: a new folder
# under /tmp); each step has a time limit, so a hung step fails instead of eating the machine's time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's packages, installed or not
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

dry="" out="" data=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry="--dry" ;;
    --out) out="$2"; shift ;;
    --data) data="$2"; shift ;;
    *) echo "error: unknown argument $1; allowed: --dry, --out DIR, --data DIR" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$out"
check=(python scripts/gpu_check.py --out "$out" $dry ${data:+--data "$data"})
started=$(date +%s)

step() {  # name, time limit (s), command...: the command's output to DIR/name.log, its exit code returned
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc after $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || tail -n 5 "$out/$name.log" | sed "s/^/  [$name] /"
  return $rc
}

if [ -n "$dry" ]; then
  device=cpu bench_eval=200 bench_layers=(--layers layer3.0.conv1 layer4.0.conv1)
else
  device=cuda bench_eval=10000 bench_layers=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
fi

step prepare 240 "${check[@]}" prepare
step bench 240 python scripts/bench.py --grid "$out/grid.yaml" --device "$device" --eval-size "$bench_eval" \
  --calibration-size 1000 --skip-seed "${bench_layers[@]}" --json "$out/bench.json"
step agree 120 "${check[@]}" agree

# the sweep, with the GPU's compute processes sampled while it runs
t0=$(date +%s)
timeout --signal=INT --kill-after=20 240 python scripts/sweep.py --grid "$out/grid.yaml" >"$out/sweep.log" 2>&1 &
sweep_pid=$!
(
  while kill -0 "$sweep_pid" 2>/dev/null; do
    echo "sample $(date +%s.%N) driver $(ps -o pid= --ppid "$sweep_pid" | tr -d ' ' | head -n 1)"
    nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null
    sleep 0.2
  done
) >"$out/gpu_apps.txt" &
sampler=$!
wait "$sweep_pid"; rc=$?
wait "$sampler"
echo "[sweep] exit $rc after $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || tail -n 5 "$out/sweep.log" | sed "s/^/  [sweep] /"
python -c "import json,sys; json.dump({'exit': $rc, 'seconds': $(( $(date +%s) - t0 )), 'ok': $rc == 0}, open(sys.argv[1], 'w'))" "$out/sweep.json"
step share 120 "${check[@]}" share  # (each sample names the sweep's driver, which holds the GPU for calibration)

echo "---- gpu_check: $(( $(date +%s) - started )) s in all; figures in $out"
"${check[@]}" report
