#!/usr/bin/env bash
# Create the benchmark peer environment: a SEPARATE venv holding mergekit 0.1.5 (LGPL), used only
# by benchmarks/merge_speed.py and benchmarks/make_parity_fixtures.py as a subprocess. It never
# touches the project's .venv.
#
#   benchmarks/setup_mergekit.sh [VENV_DIR]        # default: .bench-venv in the repo root (git-ignored)
#
# torch==2.13.0 is installed FIRST (its CPU build: `make torch-cpu`, the wheel on this machine's local disk, found
# through pip's find-links, else PyTorch's CPU index); mergekit only asks for torch>=2.0.0, which that satisfies, so pip pulls no CUDA build.
# Re-running is cheap: an existing venv with mergekit 0.1.5 is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.bench-venv}"
PY="${PY:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"

WANT="${MERGEKIT_SPEC#*==}"
if [ -x "$VENV/bin/mergekit-yaml" ] && WANT="$WANT" "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, os, sys
sys.exit(0 if m.version("mergekit") == os.environ["WANT"] else 1)
PY
then
  echo "mergekit $WANT already in $VENV"; exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
# pip's config here lists local index folders that do not all exist; drop its warnings about them.
pip_install() {
  "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
torch_version() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null
}
# the default spec goes through the Makefile's torch-cpu (a local +cpu wheel, else PyTorch's CPU index)
if ! torch_version >/dev/null; then
  if [ "$TORCH_SPEC" = "torch==2.13.0" ]; then make --no-print-directory torch-cpu BIN="$VENV/bin"; else pip_install "$TORCH_SPEC"; fi
fi
# Hold the torch just installed: mergekit's `torch>=2.0.0` must not pull another build.
pip_install "$MERGEKIT_SPEC" "torch==$(torch_version)"
"$VENV/bin/mergekit-yaml" --help >/dev/null
"$VENV/bin/python" -c 'import importlib.metadata as m; print("mergekit", m.version("mergekit"), "torch", m.version("torch"), "transformers", m.version("transformers"))'
