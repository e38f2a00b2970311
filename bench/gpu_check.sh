#!/usr/bin/env bash
# One prepared GPU check (issue #15): on a CUDA machine, run the Triton kernel tests compiled for
# real (TRITON_INTERPRET=0, test tensors on the GPU through bench/cuda_default.py), then the
# capacity bench, bench/kernels.py, bench/attention_memory.py and bench/peers.py, each writing its JSON into
# bench/results/. Refuses (exit 3) when no CUDA GPU is visible. Usage, from the repository root:
#   bash bench/gpu_check.sh [--quick]        # logs in bench/results/gpu_check/
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): refusing; nothing run" >&2
  exit 3
fi
QUICK=""; [ "${1:-}" = "--quick" ] && QUICK="--quick"
LOG=bench/results/gpu_check; mkdir -p "$LOG"
export PYTHONPATH=$PWD TRITON_INTERPRET=0 SEQSHARD_KERNELS=
$PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$LOG/device.txt"
status=0
step() {  # name, command...: run, log, remember a failure, go on
  name=$1; shift
  echo "== $name: $*"
  start=$(date +%s)
  if "$@" > "$LOG/$name.log" 2>&1; then r=ok; else r="FAILED (rc $?)"; status=1; fi
  echo "== $name: $r in $(( $(date +%s) - start ))s (log $LOG/$name.log)"; tail -5 "$LOG/$name.log"
}
step kernel_tests $PY -m pytest -q -p bench.cuda_default tests/kernels \
  --junitxml="$LOG/kernel_tests.xml"
step kernels_bench $PY bench/kernels.py
step attention_memory $PY bench/attention_memory.py
step capacity $PY bench/capacity.py $QUICK
# seqshard vs the plain transformers loop on one GPU (NCCL, bf16); with several GPUs add --sp 2 (vs ALST)
step peers $PY bench/peers.py --device cuda --dtype bf16 --sp 1 --seqlens 16384 65536 --steps 4
exit $status
