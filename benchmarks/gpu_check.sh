#!/usr/bin/env bash
# GPU check of issue 26 on a bare CUDA machine, in one call of at most 9 minutes (benchmarks/gpu_check.py has the phases).
#
#   benchmarks/gpu_check.sh --prepare [DATA_ROOT]   here, once: fill .gpu_check/ (git-ignored) with the wheels the GPU
#                                                   machine lacks and MNIST as .gz (DATA_ROOT holds MNIST/raw;
#                                                   default ../shared/data)
#   benchmarks/gpu_check.sh [OUT]                   on the GPU machine, from the repo root, .gpu_check/ carried beside
#                                                   it; writes OUT/phases.jsonl, gpu_check.json, gpu_check.md, gpu_check.log
#   benchmarks/gpu_check.sh --dry-run [OUT]         anywhere: the same phases on a CPU, tiny network, a few steps
#
# With the device tool of this workplace (one call, .gpu_check carried, ~13 MB):
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".gpu_check"], timeout_s=590)
#
# What travels in .gpu_check/ (made by --prepare; 13 MB in all, the tool carries at most 64 MiB):
#   wheels/  deepinv, natsort, hydra-core, omegaconf, antlr4-python3-runtime (pure Python, py3-none-any); the machine
#            has torch, Lightning, torchmetrics, TensorBoard, torchvision, matplotlib, h5py, einops, requests already.
#            They are installed with --no-deps into /tmp/gpu_check_site (only when an import fails).
#   mnist/   the four MNIST IDX files gzipped (11 MB instead of 53 MB), unpacked to /tmp/gpu_check_data/MNIST/raw.
#
# Each phase runs in its own process under its own limit (`timeout`), cut to what is left of the total
# (GPU_CHECK_BUDGET_S, default 510 s), so that one slow phase cannot eat the others; the summary always runs.
# GPU_CHECK_LIMIT_SCALE (default 1) multiplies every phase's limit (the CPU dry run of the tests on a busy machine).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
BUNDLE="$REPO/.gpu_check"

if [[ "${1:-}" == "--prepare" ]]; then
    root="${2:-$REPO/../shared/data}"
    mkdir -p "$BUNDLE/wheels" "$BUNDLE/mnist"
    "$PY" -m pip download --no-deps -q -d "$BUNDLE/wheels" deepinv==0.5.0 natsort==8.4.0 hydra-core==1.3.8 omegaconf==2.3.1
    "$PY" -m pip wheel --no-deps -q -w "$BUNDLE/wheels" antlr4-python3-runtime==4.9.3   # an sdist only: built here
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        gzip -9 -c "$root/MNIST/raw/$f" > "$BUNDLE/mnist/$f.gz"
    done
    du -sh "$BUNDLE"
    exit 0
fi

DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=(--dry-run)
    shift
fi
OUT="${1:-${OUT:-$REPO/benchmarks/results/gpu_check}}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TOTAL="${GPU_CHECK_BUDGET_S:-510}"
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu_check $(date -u +%FT%TZ) in $REPO -> $OUT (budget ${TOTAL} s) ${DRY[*]}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# --- what the machine lacks: from the carried wheels (one interpreter start where nothing is missing: ~12 s on 2 cores)
IMPORTS="import deepinv, hydra, omegaconf, lightning, torchvision; import ddpm_lightning.training"
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    if ! "$PY" -c "import deepinv, hydra, omegaconf" 2>/dev/null; then
        if ! ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
            echo "error: deepinv/hydra/omegaconf are missing and $BUNDLE/wheels has no wheels: run benchmarks/gpu_check.sh --prepare here and carry .gpu_check"
            exit 2
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
            "$BUNDLE"/wheels/*.whl || { echo "error: pip install of $BUNDLE/wheels failed"; exit 2; }
        export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
    fi
    "$PY" -c "$IMPORTS" || { echo "error: the project does not import (above)"; exit 2; }
fi

# --- MNIST: the carried .gz files, else DATA_ROOT (../shared/data), else (dry run) a synthetic one
DATA_ROOT="${DATA_ROOT:-$REPO/../shared/data}"
if ls "$BUNDLE"/mnist/*.gz >/dev/null 2>&1; then
    DATA_ROOT=/tmp/gpu_check_data
    mkdir -p "$DATA_ROOT/MNIST/raw"
    for f in "$BUNDLE"/mnist/*.gz; do
        gunzip -c "$f" > "$DATA_ROOT/MNIST/raw/$(basename "$f" .gz)"
    done
elif [[ ! -f "$DATA_ROOT/MNIST/raw/train-images-idx3-ubyte" ]]; then
    if [[ ${#DRY[@]} -eq 0 ]]; then
        echo "error: no MNIST: carry .gpu_check/mnist (benchmarks/gpu_check.sh --prepare) or set DATA_ROOT"
        exit 2
    fi
    DATA_ROOT="$(mktemp -d)"
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from mnist_fixtures import write_fake_mnist; write_fake_mnist('$DATA_ROOT', n_train=256, n_test=64)"
fi
echo "MNIST: $DATA_ROOT"

# --- the phases: name and limit in seconds (sums to the budget with the reserve kept for the summary)
phase() {
    local name=$1 limit=$(( $2 * ${GPU_CHECK_LIMIT_SCALE:-1} ))
    local left=$((TOTAL - (SECONDS - START) - 15))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "== $name: skipped, ${left} s left"
        printf '{"phase": "%s", "status": "skipped: %s s left of the budget"}\n' "$name" "$left" >> "$OUT/phases.jsonl"
        return
    fi
    echo "== $name (limit ${limit} s, $((SECONDS - START)) s gone)"
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py --phase "$name" --out "$OUT" \
        --data-root "$DATA_ROOT" --budget-s "$limit" "${DRY[@]}"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "== $name: stopped at its ${limit} s limit"
        printf '{"phase": "%s", "status": "timed out at %s s"}\n' "$name" "$limit" >> "$OUT/phases.jsonl"
    fi
}

phase versions 40
phase steps 130
phase census 75
phase sampling 80
phase variants 100
phase train 110
"$PY" benchmarks/gpu_check.py --phase summary --out "$OUT" > /dev/null && cat "$OUT/gpu_check.md"
echo "== done in $((SECONDS - START)) s"
