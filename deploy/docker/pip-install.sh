#!/bin/sh
# pip-install [--torch] ARGS...: pip install into $VENV (default /opt/venv), then drop bytecode caches.
# --torch: also look for torch's CPU build in $TORCH_FIND_LINKS (a folder) or $TORCH_INDEX_URL (an index).
set -eu
venv=${VENV:-/opt/venv}
extra=""
if [ "${1:-}" = "--torch" ]; then
    shift
    if [ -n "${TORCH_FIND_LINKS:-}" ]; then extra="--find-links ${TORCH_FIND_LINKS}"
    elif [ -n "${TORCH_INDEX_URL:-}" ]; then extra="--extra-index-url ${TORCH_INDEX_URL}"; fi
fi
# an empty PIP_CERT would make pip verify against nothing: only pass one that names a file
[ -n "${PIP_CERT:-}" ] && [ -f "${PIP_CERT}" ] || unset PIP_CERT
# shellcheck disable=SC2086
"$venv/bin/pip" install $extra "$@"
find "$venv" -name '__pycache__' -prune -exec rm -rf {} +
