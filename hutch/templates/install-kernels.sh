#!/usr/bin/env bash
# The code interpreter's kernels beyond Python, as `hutch.agent.languages` finds them: Deno's
# (JavaScript and TypeScript, from npm), bash_kernel (PyPI) and E2B's chart extractor (PyPI), with
# their kernelspecs under PREFIX/share/jupyter/kernels. R's kernel is Debian's (r-base-core,
# r-cran-irkernel). Used for the code-interpreter template (PREFIX /usr/local, its Python) and by
# .ci/run for the tests' host kernels (PREFIX the venv).
#   usage: install-kernels.sh PREFIX PYTHON   (npm and PYTHON's pip reach their registries)
set -euo pipefail
prefix=$1
python=$2
"$python" -m pip install -q --no-warn-script-location bash_kernel 'pydantic>=2,<3'
# E2B's chart extractor asks for numpy 2 and matplotlib 3.10; Debian's own (1.24, 3.6) stay, as
# Debian's scipy, pandas and scikit-learn are built against them.
"$python" -m pip install -q --no-deps e2b-charts
"$python" -m bash_kernel.install --prefix "$prefix" >/dev/null
npm install -g --prefix "$prefix" --no-audit --no-fund --loglevel=error deno
mkdir -p "$prefix/share/jupyter/kernels/deno"
cat > "$prefix/share/jupyter/kernels/deno/kernel.json" <<JSON
{"argv": ["$prefix/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
 "display_name": "Deno", "language": "typescript"}
JSON
