#!/bin/sh
# install-extra EXTRA: the project wheel with one service's extra into /opt/venv, pinned by constraints.txt.
set -eu
pip install -c /tmp/constraints.txt "$(ls /wheels/*.whl)[$1]"
find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +
