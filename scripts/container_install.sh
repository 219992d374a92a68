#!/bin/sh
# Install actserve into a fresh virtual environment. The Dockerfile runs exactly this script
# (both variants), and CI runs it outside any container (tests/test_deploy_install.py), so the
# pip commands a container build depends on are exercised on every CI run.
#
# usage: container_install.sh VENV_DIR [SOURCE_DIR]
#   TORCH_VERSION    torch release to install (default 2.13.0, the project's pin)
#   TORCH_INDEX_URL  where torch comes from; unset = the ordinary pip configuration.
#                    The Dockerfile sets https://download.pytorch.org/whl/cpu or .../cu130.
#   PYTHON           interpreter that creates the environment (default python3)
#   EXTRA_PACKAGES   more pinned requirements for the same environment (the loadtest image
#                    adds locust==VERSION, the pin of pyproject.toml's test extra)
set -eu

venv=${1:?usage: container_install.sh VENV_DIR [SOURCE_DIR]}
src=${2:-.}
torch_version=${TORCH_VERSION:-2.13.0}

"${PYTHON:-python3}" -m venv "$venv"
# torch first, alone, from its own index: the service's own dependencies then see it installed
# and never pull a second (CUDA) build from PyPI.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$venv/bin/pip" install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
else
    "$venv/bin/pip" install --no-cache-dir "torch==$torch_version"
fi
# The service itself (no test or load extras), a regular (not editable) install.
"$venv/bin/pip" install --no-cache-dir "$src"
if [ -n "${EXTRA_PACKAGES:-}" ]; then
    # shellcheck disable=SC2086 # a space-separated list of requirements
    "$venv/bin/pip" install --no-cache-dir $EXTRA_PACKAGES
fi
"$venv/bin/python" -c "import torch, service; print('actserve installed: torch', torch.__version__)"
