#!/usr/bin/env bash
# The GPU benchmark of issue 13, run on a machine with NVIDIA GPUs: sdgate in
# front of examples/diffusers-worker (SD 1.5 architecture, random fp16 weights),
# measured by benches/gpu/bench.py. Writes results.json, results.md, pool.png,
# sdgate.log and bench.log into $OUT (default /tmp/gpu-bench-out).
#
#   bash benches/gpu/run.sh [bench.py options]      e.g. --parts cold,onegpu
#
# It builds nothing: the sdgate binary is $SDGATE, else .gpubin/sdgate (a
# copied release build), else target/release/sdgate; hey is $HEY, else
# .gpubin/hey, else the one on PATH (without hey a Python load generator is
# used). When the Python has no diffusers, the wheels in .whl/ are installed
# into /tmp/site (diffusers 0.42.1, importlib_metadata, zipp, lazy-importer:
# see benches/gpu/RESULTS.md). Only 127.0.0.1 is used.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
# Keep NVLink multicast off (the device machines' rule); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 RUST_LOG=${RUST_LOG:-info}

SDGATE=${SDGATE:-}
for candidate in "$SDGATE" .gpubin/sdgate target/release/sdgate; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then SDGATE=$(realpath "$candidate"); break; fi
done
[ -x "$SDGATE" ] || { echo "run.sh: no sdgate binary (set SDGATE)" >&2; exit 1; }
HEY=${HEY:-}
for candidate in "$HEY" .gpubin/hey "$(command -v hey || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then HEY=$(realpath "$candidate"); break; fi
done

if ! python3 -c 'import diffusers' >/dev/null 2>&1 && compgen -G '.whl/*.whl' >/dev/null; then
    echo "run.sh: installing carried wheels: $(ls .whl | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "run.sh: wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "diffusers", diffusers.__version__)' \
    || { echo "run.sh: python3 cannot import torch and diffusers" >&2; exit 1; }
python3 -c 'import matplotlib' 2>/dev/null || echo "run.sh: no matplotlib: no pool.png"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
echo "run.sh: sdgate $SDGATE ($("$SDGATE" --version 2>/dev/null || echo '?')), hey ${HEY:-none}"

HEY_ARG=()
[ -n "$HEY" ] && HEY_ARG=(--hey "$HEY")
python3 benches/gpu/bench.py --out "$OUT" --sdgate "$SDGATE" "${HEY_ARG[@]}" "$@" 2> >(tee "$OUT/bench.log" >&2)
status=$?
sleep 0.5
exit $status
