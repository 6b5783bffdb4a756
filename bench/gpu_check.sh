#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one GPU, a CUDA build of torch installed, no network.
# Under 8 minutes on an H100/H200; prints one table and exits non-zero when a row fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TRANSFORMERS_VERBOSITY=error
python -c "import autotp" 2>/dev/null || pip install --no-build-isolation --no-deps -e . -q
# the csrc/ kernels against this machine's CUDA torch (the CUDA ones need nvcc): built in place if missing
python -c "import autotp._C, autotp._C_cuda" 2>/dev/null || python setup.py -q build_ext --inplace
exec python bench/gpu_check.py "$@"
