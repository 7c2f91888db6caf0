#!/usr/bin/env bash
# Make (or reuse) the virtual environment .venv in the repository and install into it
# PyTorch, then the requirements file given (default requirements.txt). Sourced by
# quick_start.sh and .ci/run (README "Quick start", "Tests"); sourced, it leaves the
# environment active:  . ./make_env.sh [REQUIREMENTS_FILE] [TORCH_REQUIREMENT]
requirements=${1:-requirements.txt}
torch_requirement=${2:-torch>=2.4,<3}
cd "$(dirname "${BASH_SOURCE[0]}")"
python3 -m venv .venv
. .venv/bin/activate
if command -v nvidia-smi >/dev/null; then
  pip install -q --disable-pip-version-check "$torch_requirement"
else
  # Without an NVIDIA GPU, the CPU build (PyPI's Linux build is a CUDA one of several GB).
  # PyTorch's CPU index is an extra index: its versions end in +cpu, which pip ranks above
  # the same version without it, so the CPU build wins where the index is reachable; where
  # only a package mirror is, pip tries it once (--retries 0, 10 s) instead of for minutes,
  # and takes the mirror's build.
  pip install -q --disable-pip-version-check --retries 0 --timeout 10 \
    --extra-index-url https://download.pytorch.org/whl/cpu "$torch_requirement"
fi
pip install -q --disable-pip-version-check -r "$requirements"
