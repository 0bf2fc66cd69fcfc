#!/usr/bin/env bash
# The scale study on the GPU machine, in a device call (see benchmarks/README.md, "The scale study").
# Needs .whl/ from ../shared/gpu/wheels.sh (carried: `carry: [".whl"]`). From the project root:
#   ARCHS=ViT-B-32,ViT-B-16,ViT-L-14,ViT-H-14 bash benchmarks/scale_gpu.sh     # first call
#   ARCHS=ViT-g-14,ViT-bigG-14 bash benchmarks/scale_gpu.sh                    # second call
# (ARCHS unset: all of scale.archs.) Writes $OUT/scale.json after every configuration (a call cut off at
# its limit returns what it measured), $OUT/scale.log and $OUT/nvidia-smi.txt; starts no configuration
# after BUDGET_S seconds of measuring (default 450), so the call ends inside 9 minutes.
set -uo pipefail
out=${OUT:-/tmp/scale-out}
mkdir -p "$out"
# wheels.sh's header: the packages the image lacks (bitsandbytes, open_clip_torch, ftfy, dvc, ...);
# nvidia-ml-py is on the image already
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 benchmarks/scale.py measure --out "$out" --budget-s "${BUDGET_S:-450}" ${ARCHS:+--archs "$ARCHS"} \
  2>&1 | tee "$out/scale.log"
