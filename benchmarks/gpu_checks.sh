#!/usr/bin/env bash
# Issue 19's GPU checks in one run, on a machine with a CUDA device (never part of CI):
#   1. the gpu-marked tests: a decode step issues no host sync and CUDA graphs give the eager
#      tokens, outputs stay on the device, CUDA int8/int4/nf4 and fp16 against fp32, the engine's
#      peak memory within the cache budget, and the fault tests (out of memory at join, NaN rows,
#      a failing step, clients that leave, a slow reader; 32 clients x 5 requests) on CUDA;
#   2. `cogvlm bench` in bf16 at batch 1, 8 and 32, eagerly and as CUDA graphs, with peak memory,
#      on the CogVLM-1 (490 px) and CogVLM2 (1344 px) bench geometries.
# Everything is written to $OUT (default ./gpu-checks): the GPU's name, the test log, the figures.
set -uo pipefail
out="${OUT:-gpu-checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
HF_HUB_OFFLINE=1 python -m pytest -q -m gpu -o addopts="" tests > "$out/gpu-tests.log" 2>&1
echo "gpu tests: exit $? (log in $out/gpu-tests.log)"
for preset in bench-490 bench-cogvlm2-1344; do
  cogvlm bench --preset "$preset" --device cuda --dtype bfloat16 --batch 8,32 --new-tokens 64 \
    --cuda-graphs both --out "$out/bench-$preset.json" > "$out/bench-$preset.txt" 2>&1
  echo "bench $preset: exit $?"
done
