#!/usr/bin/env bash
# The prepared device check: run once on a lent GPU; writes its pages under OUT (default
# docs/benchmarks/gpu-check), with the device named in each.
#   1. float64 meta-gradients of the loop, vmap and compile engines on the device against central
#      differences (benchmarks/fd_check.py);
#   2. the speed table — sinusoid, conv4 K=1 and K=5, resnet10t — for every engine (compiled and
#      CUDA-graphed included) beside raw higher, TorchOpt and the hand torch.func loops (plain,
#      compiled, and compiled with the outer gradient inside the graph), with the peak memory of each (torch.cuda.max_memory_allocated).
# speed.json is written after every contender, so a run stopped by the device's time limit keeps what it
# finished (python benchmarks/speed.py --report-only --docs OUT renders it, naming the rows it did not reach).
# DEVICE_CHECK_TINY=1: the same steps on CPU in a tiny mode (tests/test_benchmarks.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/benchmarks/gpu-check}"
CONTENDERS=("metaopt maml" "metaopt maml (vmap)" "metaopt maml (compile)" "metaopt maml (compile, CUDA graphs)"
            "raw higher" torchopt torch.func "hand vmap" "hand vmap (compiled)" "hand vmap (compiled meta-gradient)")
if [ "${DEVICE_CHECK_TINY:-0}" = 1 ]; then  # every step; of the contenders, the compiled ones and one hand loop
  DEVICE=cpu STEPS=(1) ITERS=1 WARMUP=1
  WORKLOADS=("sinusoid mlp, 10-shot, mb 25, K=1")
  CONTENDERS=("metaopt maml (compile)" "metaopt maml (compile, CUDA graphs)" "hand vmap (compiled)"
              "hand vmap (compiled meta-gradient)")
else
  DEVICE=cuda STEPS=(1 3) ITERS=10 WARMUP=2
  WORKLOADS=("sinusoid mlp, 10-shot, mb 25, K=1" "conv4 28px 5w1s, mb 8, K=1" "conv4 28px 5w1s, mb 8, K=5"
             "resnet10t 84px 5w1s, mb 4, K=1")
fi
python benchmarks/fd_check.py --device "$DEVICE" --steps "${STEPS[@]}" --docs "$OUT"
python benchmarks/speed.py --workloads "${WORKLOADS[@]}" --rounds 1 --iters "$ITERS" --warmup "$WARMUP" --no-memory \
  --docs "$OUT" --contenders "${CONTENDERS[@]}"
