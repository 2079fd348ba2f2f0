#!/usr/bin/env bash
# Installs what kvq needs to build and test on Debian 12 (or Ubuntu 22.04+),
# skipping whatever is already present. Safe to run again.
set -euo pipefail

"$(dirname "$0")/install-debs.sh" "Debian packages" \
  build-essential cmake g++ clang libclang-rt-14-dev googletest libgtest-dev libbenchmark-dev \
  libfmt-dev libcli11-dev nlohmann-json3-dev libhwy-dev python3 python3-pip unzip ca-certificates

# Python side of the test suite: NumPy references and the gguf package for fixtures.
py_missing=()
python3 -c "import numpy" 2>/dev/null || py_missing+=("numpy")
python3 -c "import gguf" 2>/dev/null || py_missing+=("gguf==0.19.0")
python3 -c "import pytest" 2>/dev/null || py_missing+=("pytest")
# Plots of scripts/eval-kv.sh (the tests skip the PNG part without it).
python3 -c "import matplotlib" 2>/dev/null || py_missing+=("matplotlib")
if ((${#py_missing[@]})); then
  echo "kvq: installing Python packages: ${py_missing[*]}"
  python3 -m pip install -q "${py_missing[@]}" 2>/dev/null ||
    python3 -m pip install -q --break-system-packages "${py_missing[@]}"
fi
