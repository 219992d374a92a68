#!/usr/bin/env bash
# GPU check: the CUDA tests and a short GPU benchmark, in under 5 minutes on one GPU.
# On the lent GPU machine (torch preinstalled, no internet) the other runtime packages
# travel as wheels in .whl/ (see docs/gpu.md); elsewhere `make gpu-check` uses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
OUTDIR=${OUT:-/tmp}
status=0  # every step runs even when an earlier one fails: one GPU run should tell all
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gpu_custom.py \
  tests/test_gpu_lab.py 2>&1 \
  | tee "$OUTDIR/gpu_tests.log" || status=1
# CUDA shared memory (CUDA IPC handles) over HTTP and gRPC, --engine process and inline;
# the tritonclient.utils.cuda_shared_memory cases skip, naming why, without cuda-python
timeout 240 $PY -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu_cuda_shm.py \
  "tests/test_grpc_tritonclient.py::test_cuda_shared_memory_on_a_cuda_server_refuses_a_bad_handle_by_name" \
  2>&1 | tee "$OUTDIR/gpu_cuda_shm_tests.log" || status=1
timeout 150 $PY -m scripts.gpu_bench 2>&1 | tee "$OUTDIR/gpu_bench.md" || status=1
timeout 150 $PY -m scripts.gpu_http_bench 2>&1 | tee "$OUTDIR/gpu_http_bench.md" || status=1
# fusion: compiled x * sigmoid(1.702 * x) vs eager, 16M float32 (bar >= 2x)
timeout 150 $PY scripts/gpu_fusion_bench.py 2>&1 | tee "$OUTDIR/gpu_fusion_bench.md" || status=1
# the engine process on CUDA behind 1, 4 and 8 HTTP workers (--engine auto is process on CUDA)
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_engine_process.py 2>&1 \
  | tee "$OUTDIR/engine_process_tests.log" || status=1
timeout 240 $PY -m scripts.gpu_http_bench --devices cuda:0 --workers 1,4,8 --seconds 1.5 \
  --clients 16 2>&1 | tee "$OUTDIR/gpu_workers_bench.md" || status=1
exit $status
