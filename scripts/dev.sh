#!/usr/bin/env bash
# The README's two commands, each doing its whole set-up on first use:
#
#   bash scripts/dev.sh demo [otflow fit options...]   train on the 8-Gaussians toy, write 8gaussians.png
#   bash scripts/dev.sh test [pytest arguments...]     the test suite (python -m pytest)
#
# Needs bash and Python >= 3.10, nothing else. The first run makes a virtual environment
# (.venv) and installs otflow into it; later runs reuse it and skip the installs while
# pyproject.toml and the torch choice are unchanged (a stamp file in the environment).
#
# torch: on a machine without an NVIDIA GPU (no working `nvidia-smi`) a CUDA build of
# torch (several GB) is never installed. pip is first asked, as a dry run that reads only
# metadata, what it would install; if that pulls NVIDIA's CUDA libraries, torch comes
# from PyTorch's CPU index instead. On a GPU machine pip's default (PyPI: the CUDA build)
# is installed.
#
# Environment (all optional):
#   OTFLOW_PYTHON            the interpreter that makes the environment (default: python3)
#   OTFLOW_VENV              where the environment lives (default: .venv)
#   OTFLOW_FRESH_VENV=1      make the environment anew (CI does)
#   OTFLOW_TORCH             the torch requirement (default: torch==2.13.0, the pin of the
#                            machines this project is developed on; e.g. OTFLOW_TORCH=torch)
#   OTFLOW_TORCH_CPU_INDEX   the CPU wheel index (default: https://download.pytorch.org/whl/cpu)
#   OTFLOW_TORCH_INDEX       install torch from this index, whatever the machine (no detection)
#   OTFLOW_DEVICE            cpu or gpu: overrides the detection of an NVIDIA GPU
set -euo pipefail

usage() { echo "usage: bash scripts/dev.sh {demo|test} [arguments...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
task=$1; shift
case "$task" in demo | test) ;; *) usage ;; esac

cd "$(dirname "$0")/.."
python_bin=${OTFLOW_PYTHON:-python3}
venv=${OTFLOW_VENV:-.venv}
torch_spec=${OTFLOW_TORCH:-torch==2.13.0}
cpu_index=${OTFLOW_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

say() { echo "== $*" >&2; }

# quiet pip; drop the notes some pip configurations print about missing local package folders
pip_install() {
    python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

device() {
    if [[ -n "${OTFLOW_DEVICE:-}" ]]; then
        case "$OTFLOW_DEVICE" in
            cpu | gpu) echo "$OTFLOW_DEVICE" ;;
            *) echo "OTFLOW_DEVICE must be cpu or gpu, got '$OTFLOW_DEVICE'" >&2; exit 2 ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo gpu
    else
        echo cpu
    fi
}

make_venv() {
    if ! command -v "$python_bin" >/dev/null 2>&1; then
        echo "$python_bin not found: install Python >= 3.10, or name it with OTFLOW_PYTHON=..." >&2
        exit 1
    fi
    if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "otflow needs Python >= 3.10; $python_bin is $("$python_bin" --version 2>&1). Name another with" \
             "OTFLOW_PYTHON=python3.11" >&2
        exit 1
    fi
    if [[ "${OTFLOW_FRESH_VENV:-0}" == 1 || ! -x "$venv/bin/python" ]]; then
        say "creating $venv with $("$python_bin" --version 2>&1)"
        "$python_bin" -m venv --clear "$venv"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
}

# Does installing $torch_spec with pip's configured sources pull NVIDIA's CUDA libraries?
# (a dry run: pip resolves from metadata and downloads no wheel; if it cannot tell, assume so)
default_torch_is_cuda() {
    local report
    report=$(mktemp)
    python -m pip install -q --dry-run --ignore-installed --report "$report" "$torch_spec" >/dev/null 2>&1 || {
        rm -f "$report"; return 0; }
    python - "$report" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
names = {i["metadata"]["name"].lower() for i in items}
torch = [i["metadata"]["version"] for i in items if i["metadata"]["name"].lower() == "torch"]
cuda = any(n.startswith("nvidia-") for n in names) or any("+cu" in v for v in torch)
sys.exit(0 if cuda else 1)
PY
    local rc=$?
    rm -f "$report"
    return $rc
}

install_torch() {
    local where
    where=$(device)
    if [[ -n "${OTFLOW_TORCH_INDEX:-}" ]]; then
        say "$torch_spec from $OTFLOW_TORCH_INDEX (OTFLOW_TORCH_INDEX)"
        pip_install "$torch_spec" --index-url "$OTFLOW_TORCH_INDEX"
    elif [[ "$where" == gpu ]]; then
        say "NVIDIA GPU found: pip install $torch_spec (the CUDA build)"
        pip_install "$torch_spec"
    elif default_torch_is_cuda; then
        say "no NVIDIA GPU: $torch_spec from the CPU index $cpu_index"
        pip_install "$torch_spec" --index-url "$cpu_index"
    else
        say "no NVIDIA GPU: $torch_spec (pip's sources hold a CPU build)"
        pip_install "$torch_spec"
    fi
}

# the versions installed; on a machine without a GPU, fail on a CUDA build of torch
check_install() {
    python - "$(device)" <<'PY'
import sys, otflow, torch
print(f"== otflow {otflow.__version__}, torch {torch.__version__}", file=sys.stderr)
if sys.argv[1] == "cpu" and torch.version.cuda:
    sys.exit(f"torch {torch.__version__} is a CUDA build on a machine without an NVIDIA GPU: set "
             "OTFLOW_TORCH_CPU_INDEX to a CPU wheel index, then rerun with OTFLOW_FRESH_VENV=1")
if sys.argv[1] == "gpu" and not torch.version.cuda:
    print(f"== warning: torch {torch.__version__} is a CPU build but this machine has an NVIDIA GPU; for the "
          "CUDA build rerun with OTFLOW_FRESH_VENV=1 OTFLOW_TORCH_INDEX=https://download.pytorch.org/whl/cu128 "
          "(your CUDA version)", file=sys.stderr)
PY
}

sha256_hex() { python -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'; }

setup() {
    local extras=$1 stamp key
    make_venv
    stamp="$venv/.otflow-setup-$task"
    key="$(cat pyproject.toml) | $torch_spec | $(device) | $extras"
    key=$(printf '%s' "$key" | sha256_hex)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
        say "reusing $venv (set up for '$task')"
        return
    fi
    install_torch
    say "pip install -e .[$extras]"
    pip_install -e ".[$extras]"
    check_install
    echo "$key" > "$stamp"
}

start=$SECONDS
case "$task" in
    demo)
        setup "torch,plot"
        say "otflow fit 8gaussians --plot 8gaussians.png $* (set-up took $((SECONDS - start)) s)"
        exec otflow fit 8gaussians --plot 8gaussians.png "$@"
        ;;
    test)
        setup "torch,jax,test"
        say "python -m pytest $* (set-up took $((SECONDS - start)) s)"
        set +e
        python -m pytest "$@"
        rc=$?
        set -e
        if [[ $rc -eq 5 ]]; then
            say "pytest collected no tests: failing"
            exit 1
        fi
        exit "$rc"
        ;;
esac
