#!/usr/bin/env bash
# What this project measures on a bare GPU machine, prepared here and run there as one call. That
# machine has Python with torch (CUDA) and numpy, but no Ray, no network and no install of
# forwardflow; it takes 64 MiB of files in all (working tree, ../shared, carried paths) and runs a
# command for at most 10 minutes (../shared/gpu/README.md).
#
#   bash benchmarks/gpu_session.sh pack   # here, with network: .gpu/ray-slim.tar.xz (33 MB: Ray and
#                                         # what the test suite imports; PYVER=3.12 if the GPU
#                                         # machine's Python is 3.12) and .gpu/cifar10-jpeg75.tar.gz
#   bash benchmarks/gpu_session.sh run [device] [tests]
#                                         # there, carrying both files: results under $OUT
#
# run does, in order, within BUDGET seconds (default 300: a rerun still fits in the session's time):
#   1. the machine (Python, torch, CUDA, GPUs, cores) and Ray's import: session.md
#   2. device: the device check (benchmarks/device_check.py, DEVICE_SECONDS per run, default 20):
#      device.md, its log device.log
#   3. tests: the test suite on that machine with the time left (skipped under 90 s):
#      tests/test_on_gpu.py first (gpu-tests.txt), then the rest (tests.txt)
# Both parts when none is named. Each part's exit status and time go into session.md; the script
# exits 1 if a part failed. DEVICE_ARGS adds arguments to the device check (e.g. --no-ray). TINY=1
# runs the CPU-sized device check (--tiny), PYTHON another interpreter (default python3): how the
# script is tried on a CPU before a session.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
pack=.gpu/ray-slim.tar.xz
python=${PYTHON:-python3}

case "${1:-}" in
pack)
    mkdir -p .gpu
    # pytest and the suite's imports (tests/ and the packages); matplotlib (about 12 MB more) is left
    # out to stay within 64 MiB beside the CIFAR-10 copy, so tests/test_monitoring.py is skipped there.
    EXTRA="pytest prometheus-client pillow tqdm hypothesis psutil" bash ../shared/gpu/pack-ray.sh "$pack" || exit 1
    # The CIFAR-10 copy (19 MB): ../shared beside the checkout does not travel, a carried path does.
    cp -f ../shared/datasets/cifar10-jpeg75.tar.gz .gpu/ || exit 1
    echo "carry: .gpu/ray-slim.tar.xz .gpu/cifar10-jpeg75.tar.gz ($(du -cb .gpu/*.tar.* | tail -1 | cut -f1) bytes)"
    exit 0
    ;;
run)
    shift
    parts=${*:-device tests}
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh pack | run [device] [tests]" >&2
    exit 2
    ;;
esac

out=${OUT:-runs/gpu-session}
mkdir -p "$out"
out=$(realpath "$out")
budget=${BUDGET:-300}
started=$SECONDS
status=0
left() { echo $((budget - (SECONDS - started))); }
note() { echo "$*" | tee -a "$out/session.md"; }
part() { # part NAME SECONDS LOG COMMAND...: COMMAND under a time limit, output to LOG; notes status, time
    local name=$1 limit=$2 log=$3 begun=$SECONDS rc
    shift 3
    if [ "$limit" -lt 1 ]; then
        status=1
        note "- $name: not run, the budget was spent"
        return
    fi
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    note "- $name: exit $rc after $((SECONDS - begun)) s$([ "$rc" -eq 124 ] && echo " (cut at its $limit s limit)")"
}

: >"$out/session.md"
note "# GPU session ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
note ""
note "- Python $("$python" -c 'import sys; print(sys.version.split()[0])'); $("$python" -c 'import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs:",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none")')"
note "- $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo)"

# Ray from the carried copy: its worker processes inherit PYTHONPATH, so it is exported.
if [ -f "$pack" ]; then
    # Unpacked once per pack: a folder older than the archive is from an earlier pack.
    [ .gpu/ray-slim -nt "$pack" ] || { rm -rf .gpu/ray-slim && tar -xJf "$pack" -C .gpu && touch .gpu/ray-slim; }
    export PYTHONPATH=$repo/.gpu/ray-slim${PYTHONPATH:+:$PYTHONPATH} PATH=$repo/.gpu/ray-slim/bin:$PATH
    export RAY_USAGE_STATS_ENABLED=0
fi
note "- Ray: $("$python" -c 'import ray; print(ray.__version__, "from", ray.__file__)' 2>&1 | tail -1)"

# forwardflow from this checkout, as a package of links (the machine has no install of it).
links=$(mktemp -d)
mkdir "$links/forwardflow"
for folder in pipeline actors launch monitoring; do ln -s "$repo/$folder" "$links/forwardflow/$folder"; done
export PYTHONPATH=$links:$repo${PYTHONPATH:+:$PYTHONPATH}
note ""

if [[ " $parts " == *" device "* ]]; then
    device_args=(--seconds "${DEVICE_SECONDS:-20}" --output "$out/device.md")
    [ -n "${TINY:-}" ] && device_args=(--tiny --output "$out/device.md")
    read -r -a extra <<<"${DEVICE_ARGS:-}"
    device_args+=("${extra[@]}")
    part "device check (python3 benchmarks/device_check.py ${device_args[*]})" "$(left)" "$out/device.log" \
        "$python" benchmarks/device_check.py "${device_args[@]}"
    grep -E '^device check|Error' "$out/device.log" | tail -n 20
fi

if [[ " $parts " != *" tests "* ]]; then
    :
elif [ "$(left)" -lt 90 ]; then
    note "- test suite: skipped, $(left) s of the budget left"
else
    # What the carried tools cannot run is left out by name, not by failing: the lint and type gates
    # need ruff and mypy, the run reports' plots matplotlib, the cluster launcher's test Ray's
    # dashboard and job server (ray[default]); none of them is carried.
    skip=()
    command -v ruff >/dev/null || skip+=(--deselect tests/test_quality.py::test_ruff_finds_nothing_and_the_code_is_formatted)
    command -v mypy >/dev/null || skip+=(--deselect tests/test_quality.py::test_mypy_finds_no_type_error)
    "$python" -c 'import matplotlib' 2>/dev/null || skip+=(--ignore tests/test_monitoring.py
        --deselect tests/test_outputs.py::test_a_directory_holding_a_run_is_refused_unless_resumed_or_overwritten)
    "$python" -c 'import aiohttp' 2>/dev/null || skip+=(--ignore tests/test_cluster_launcher.py)
    # The tests only a GPU can run first: a suite cut at the budget still has their results.
    part "tests only a GPU runs (python3 -m pytest -q -rfEs tests/test_on_gpu.py)" "$(left)" "$out/gpu-tests.txt" \
        "$python" -m pytest -q -rfEs -p no:cacheprovider tests/test_on_gpu.py
    tail -n 15 "$out/gpu-tests.txt"
    part "the rest of the suite (python3 -m pytest -q -rfEs tests --ignore tests/test_on_gpu.py ${skip[*]})" \
        "$(left)" "$out/tests.txt" \
        "$python" -m pytest -q -rfEs -p no:cacheprovider tests --ignore tests/test_on_gpu.py "${skip[@]}"
    tail -n 25 "$out/tests.txt"
fi
note "- session: $((SECONDS - started)) s in all"
exit $status
