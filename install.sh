#!/usr/bin/env bash
# Install pacsbridge into ./.venv (Python >= 3.11).  ./install.sh [--dev]
#   --dev  also installs the test and lint tools.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "pacsbridge needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

# PyTorch (for the AI models): where pip finds a CPU build of torch 2.13.0 without an index
# (a local wheel in its find-links), pin it, so that nothing pulls a multi-GB CUDA build.
# Elsewhere pip resolves torch as usual, and a machine with a GPU gets a CUDA build.
constraints=.venv/pacsbridge-constraints.txt
: > "$constraints"
probe=$(mktemp -d)
if "${pip[@]}" download -q --no-deps --no-index -d "$probe" "torch==2.13.0" >/dev/null 2>&1; then
    echo "torch==2.13.0" >> "$constraints"
fi
rm -rf "$probe"

target="."
[ "${1:-}" = "--dev" ] && target=".[dev]"
"${pip[@]}" install -q -c "$constraints" -e "$target"
echo "pacsbridge installed in $(pwd)/.venv — start it with: .venv/bin/pacsbridge serve"
