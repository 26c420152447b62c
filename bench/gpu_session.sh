#!/usr/bin/env bash
# GPU checks for a lent device machine (the `device` tool), in stages that fit one short lease.
#
#   bash bench/gpu_session.sh torch   # CUDA tests that need no DALI + bench/train_step.py
#   bash bench/gpu_session.sh eval    # bench/eval.py
#   bash bench/gpu_session.sh dali    # every `gpu` test (DALI too) + bench/loader.py + the whole suite there
#
# Why stages: the device machine cannot reach PyPI, so the packages its image lacks travel with the
# working tree, which is capped at 64 MiB per call. The small wheels (webdataset, pycocotools,
# torchattacks, ...) go in .gpu_w/; DALI + nvImageCodec (~160 MB as one tar.xz) is split into
# .gpu_0/ .gpu_1/ .gpu_2/, one part per call. A carried folder is removed there by the next call that
# does not carry it, but /tmp stays while the machine is warm: every call copies the parts it carries to
# /tmp/parts, so carry .gpu_0 with `torch`, .gpu_1 with `eval`, .gpu_2 with `dali`, in one lease
# (2026-11-26 on an H200: 50 s + 15 s + 190 s of commands, ~6 min of device time with the start).
# How the payload was made (on the CPU machine; .gitignore keeps .gpu_* out of git):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...
#     nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13
#     astunparse gast libcst makefun nvtx optree
#   unzip them into one folder, keep only the cpython-312 extension modules, make nvidia/__init__.py
#   a pkgutil namespace (so the image's own nvidia.* packages stay importable), tar | xz, split -b 53000000.
# Every log and results table lands in $OUT (the device tool brings it back).
set -u
stage=${1:?stage: torch, eval or dali}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/parts
cp .gpu_[0-9]/part.* /tmp/parts/ 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site0 .gpu_w/*.whl \
    >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site0:$PWD

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}

if [ "$stage" = torch ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import sys, torch, numba, numpy, cv2, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'numba', numba.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())"
    step gpu_tests_torch 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/sat_train/test_fit.py
    step train_step 150 python3 bench/train_step.py --device cuda --out "$OUT/train_step.md"
elif [ "$stage" = eval ]; then
    step eval 120 python3 bench/eval.py --device cuda --arch resnet18
    cp bench/results/eval.md "$OUT/eval.md" 2>/dev/null
elif [ "$stage" = dali ]; then
    t0=$SECONDS
    cat /tmp/parts/part.* | xz -d -T0 | tar xf - -C /tmp/site0 || { echo "payload incomplete"; ls -la /tmp/parts; exit 1; }
    echo "payload unpacked in $((SECONDS - t0)) s"
    export LD_LIBRARY_PATH=/tmp/site0/nvidia/cu13/lib:/tmp/site0/nvidia/nvjpeg2k/lib:/tmp/site0/nvidia/nvtiff/lib:${LD_LIBRARY_PATH:-}
    python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -3
    step gpu_tests_dali 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests
    step loader 200 python3 bench/loader.py --device cuda --workers 8 --out "$OUT/loader.md"
    step suite 170 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 150 tests
else
    echo "unknown stage $stage"; exit 2
fi
