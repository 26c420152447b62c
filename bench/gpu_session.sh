#!/usr/bin/env bash
# GPU checks for a lent device machine (the `device` tool): ONE call of at most 8 minutes.
#
#   bash bench/gpu_session.sh all     # gpu tests + Triton kernel sweep + fit throughput + loader bench (<= 8 min)
#   bash bench/gpu_session.sh part    # only stash the carried DALI payload part in /tmp/parts (seconds)
#   bash bench/gpu_session.sh torch|eval|dali   # the 2026-11-26 stages, kept for reruns of those tables
#
# The device machine cannot reach PyPI, so the packages its image lacks travel with the working tree,
# capped at 64 MiB per call. The small wheels (webdataset, pycocotools, torchattacks, ...) go in .gpu_w/
# and travel with every call (`carry: [".gpu_w", ...]`). DALI + nvImageCodec (~160 MB as one tar.xz)
# is split into .gpu_0/ .gpu_1/ .gpu_2/, one part per call; /tmp survives between calls while the
# machine is warm, and every call copies the part it carries to /tmp/parts. So, in one lease:
#   with DALI:    run `part` carrying .gpu_0, `part` carrying .gpu_1, then `all` carrying .gpu_2 + .gpu_w
#   without DALI: run `all` carrying .gpu_w only (the dali columns and DALI's gpu tests are skipped, said so)
# How the payload was made (on the CPU machine; .gitignore keeps .gpu_* out of git):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...
#     nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13
#     astunparse gast libcst makefun nvtx optree
#   unzip them into one folder, keep only the cpython-312 extension modules, make nvidia/__init__.py
#   a pkgutil namespace (so the image's own nvidia.* packages stay importable), tar | xz, split -b 53000000.
#
# Time budget of `all` (per-step limits; they sum to 460 s of the 480 s allowed, setup included):
#   setup 40 s | kernel sweep 90 s | fit throughput 170 s | gpu tests 100 s | loader bench 60 s
# Results: at most 8 files come back from $OUT, so step logs stay in /tmp/gpu-logs and their tails go
# to $OUT/session.log; the tables are $OUT/sat_kernel.md, fit_throughput_cuda.md, loader.md.
set -u
stage=${1:?stage: all, part, torch, eval or dali}
OUT=${OUT:-/tmp/gpu-out}
LOGS=/tmp/gpu-logs
mkdir -p "$OUT" "$LOGS" /tmp/parts
cp .gpu_[0-9]/part.* /tmp/parts/ 2>/dev/null
if [ "$stage" = part ]; then
    ls -la /tmp/parts; exit 0
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site0 .gpu_w/*.whl \
    >"$LOGS/pip.log" 2>&1 || { tail "$LOGS/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site0:$PWD

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOGS/NAME.log, its tail to session.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    { echo "=== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"; tail -n 30 "$LOGS/$name.log"; } \
        | tee -a "$OUT/session.log"
}

unpack_dali() {  # 0 when DALI imports (payload parts complete in /tmp/parts), else 1
    local t0=$SECONDS
    [ "$(ls /tmp/parts/part.* 2>/dev/null | wc -l)" -ge 3 ] || { echo "DALI payload absent or incomplete"; return 1; }
    cat /tmp/parts/part.* | xz -d -T0 | tar xf - -C /tmp/site0 || { echo "payload broken"; return 1; }
    export LD_LIBRARY_PATH=/tmp/site0/nvidia/cu13/lib:/tmp/site0/nvidia/nvjpeg2k/lib:/tmp/site0/nvidia/nvtiff/lib:${LD_LIBRARY_PATH:-}
    python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -3
    echo "payload unpacked in $((SECONDS - t0)) s"
    python3 -c "import nvidia.dali.plugin.pytorch" 2>/dev/null
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import sys, torch, numba, numpy, cv2, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'numba', numba.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())"
}

if [ "$stage" = all ]; then
    versions | tee -a "$OUT/session.log"
    if unpack_dali >>"$OUT/session.log" 2>&1; then
        dali=1; not_dali=""
    else
        dali=0; not_dali="not gpu_decode"  # DALI's own gpu test; the device backend's and fit's run without DALI
        echo "no DALI: dali columns and DALI gpu tests skipped" | tee -a "$OUT/session.log"
    fi
    step sat_kernel 90 python3 bench/sat_kernel.py --quick --out "$OUT/sat_kernel.md"
    step fit_throughput 170 python3 bench/fit_throughput.py --device cuda --images 32768 --rounds 1 \
        --out "$OUT/fit_throughput_cuda.md"
    # a test module whose import needs a package this image lacks must not stop the gpu tests of the others
    step gpu_tests 100 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -k "$not_dali" tests
    if [ "$dali" = 1 ]; then
        step loader 60 python3 bench/loader.py --device cuda --workers 8 --quick --out "$OUT/loader.md"
    fi
    echo "=== all: done in $SECONDS s" | tee -a "$OUT/session.log"
elif [ "$stage" = torch ]; then
    versions
    step gpu_tests_torch 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/sat_train/test_fit.py
    step train_step 150 python3 bench/train_step.py --device cuda --out "$OUT/train_step.md"
elif [ "$stage" = eval ]; then
    step eval 120 python3 bench/eval.py --device cuda --arch resnet18
    cp bench/results/eval.md "$OUT/eval.md" 2>/dev/null
elif [ "$stage" = dali ]; then
    unpack_dali || exit 1
    step gpu_tests_dali 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests
    step loader 200 python3 bench/loader.py --device cuda --workers 8 --out "$OUT/loader.md"
    step suite 170 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 150 tests
else
    echo "unknown stage $stage"; exit 2
fi
