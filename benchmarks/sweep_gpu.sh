#!/usr/bin/env bash
# Sweep wall time on N GPUs against 1: one grid of study variants through DVC's experiment queue, first with
# every GPU of the machine (dvc queue start --jobs N, each stage process claiming a free GPU through
# model.device: auto), then the same grid on GPU 0 alone (CUDA_VISIBLE_DEVICES=0, --jobs 1). Each run gets a
# fresh copy of the project (its own DVC cache and run-cache, so the second cannot restore the first's
# results), whose baseline (prepare, quantize) is built before the clock starts (tools/sweep.py).
#
# Usage, from the project root on a machine with several GPUs:
#   benchmarks/sweep_gpu.sh multi      # all GPUs
#   benchmarks/sweep_gpu.sh single     # the same grid on one GPU
#   benchmarks/sweep_gpu.sh both       # both, one after the other
#   benchmarks/sweep_gpu.sh report     # CPU is fine: the table from the two runs' JSON in $OUT
# Results in ${OUT:-benchmarks/results/sweep} (flat: the device tool returns at most 8 files):
#   sweep-<mode>.json  tools.sweep's summary (wall time, states, each stage's GPU claim) + machine facts
#                      + what nvidia-smi saw (processes per GPU; any process on two GPUs)
#   sweep-<mode>.log   the sweep's output;  sweep-<mode>-apps.txt  nvidia-smi's compute processes each second
#   sweep.md           the table (report; also written by `both`)
# Workload (env): SWEEP_GRID, default 8 variants (lora.r 2,4,8,16 x lora.dropout 0.1,0.25); the params
# overlay below (ViT-B-16 with random weights: memory and time are real; the offline synthetic `shapes`
# dataset; one method, one seed, 200 steps), or SWEEP_OVERRIDES=<yaml file> instead.
#
# On the device tool's GPU machines (no registry there; dvc and friends travel as wheels): once, on the CPU
# machine, from the project root: `../shared/gpu/wheels.sh` (-> .whl/, git-ignored). Then one run per mode,
# carry [".whl"], kind nvidia-h200-x2 (or larger), timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 9;
#   export PYTHONPATH=/tmp/site:$PWD/src:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1;
#   benchmarks/sweep_gpu.sh multi
# and the same with `single`; then, here, `OUT=<folder holding both JSON files> benchmarks/sweep_gpu.sh report`
# and commit the files as benchmarks/results/<date>-<gpu>-sweep-*.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-both}
out=${OUT:-benchmarks/results/sweep}
mkdir -p "$out"
here=$PWD
py=$(command -v python3 || command -v python)

if [ "$mode" = report ]; then
  exec "$py" benchmarks/sweep_gpu.py report "$out/sweep-multi.json" "$out/sweep-single.json" "$out/sweep.md"
fi

# dvc.yaml's commands say `python`; some images have only python3
if ! command -v python >/dev/null; then
  mkdir -p /tmp/sweep-bin && ln -sf "$py" /tmp/sweep-bin/python && export PATH=/tmp/sweep-bin:$PATH
fi
command -v dvc >/dev/null || { echo "sweep_gpu.sh: dvc not found (install it, or the .whl wheels: see the header)"; exit 9; }
command -v nvidia-smi >/dev/null || { echo "sweep_gpu.sh: nvidia-smi not found: this needs NVIDIA GPUs"; exit 9; }

work=$(mktemp -d /tmp/sweep-gpu.XXXXXX)
overrides=${SWEEP_OVERRIDES:-$work/overrides.yaml}
if [ -z "${SWEEP_OVERRIDES:-}" ]; then
  cat > "$overrides" <<'YAML'
datasets: [shapes]
methods: [lora]
data:
  seeds: [1]
model:
  arch: ViT-B-16
  pretrained: none
train:
  iterations_per_shot: 50
  lr: 2.0e-3
  checkpoint_every: 1000
profile:
  batches: ["32x1"]
  n_classes: 12
  warmup: 3
  steps: 10
YAML
fi
read -r -a grid <<< "${SWEEP_GRID:--S lora.r=2,4,8,16 -S lora.dropout=0.1,0.25}"
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
ngpu=$(nvidia-smi -L | grep -c '^GPU ')
# the same CPU threads per experiment in both runs, so only the number of GPUs and jobs differs
export OMP_NUM_THREADS=$(( $(nproc) / ngpu > 0 ? $(nproc) / ngpu : 1 ))

sample() {
  while :; do
    echo "T $(date +%s.%N)"
    nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits 2>&1 || true
    sleep 1
  done
}

one() {  # one() MODE JOBS [CUDA_VISIBLE_DEVICES]
  local m=$1 jobs=$2 rc=0 sampler
  echo "== sweep $m: --jobs $jobs${3:+, CUDA_VISIBLE_DEVICES=$3}, $OMP_NUM_THREADS threads each"
  sample > "$out/sweep-$m-apps.txt" & sampler=$!
  ( if [ -n "${3:-}" ]; then export CUDA_VISIBLE_DEVICES=$3; fi
    "$py" -m tools.sweep "$here" "$work/$m" --jobs "$jobs" --overrides "$overrides" "${grid[@]}" \
      --summary "$out/sweep-$m.json" ) 2>&1 | tee "$out/sweep-$m.log" || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  [ -f "$out/sweep-$m.json" ] && ( if [ -n "${3:-}" ]; then export CUDA_VISIBLE_DEVICES=$3; fi
    "$py" benchmarks/sweep_gpu.py finish "$out/sweep-$m.json" "$out/sweep-$m-apps.txt" "$overrides" )
  return $rc
}

case $mode in
  multi)  one multi "$ngpu" ;;
  single) one single 1 0 ;;
  both)   rc=0; one multi "$ngpu" || rc=$?; one single 1 0 || rc=$?
          "$py" benchmarks/sweep_gpu.py report "$out/sweep-multi.json" "$out/sweep-single.json" "$out/sweep.md"
          exit $rc ;;
  *) echo "usage: $0 multi|single|both|report"; exit 2 ;;
esac
