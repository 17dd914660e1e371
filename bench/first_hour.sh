#!/bin/sh
# The first hour of a new user (issue 15), end to end on the tiny real layouts: init/track/
# commit/diff/checkout, stash/rebase/cherry-pick, `git merge` with a TIES rule, push and a
# partial clone, potluck.load, mergekit YAML and flag merges, patches, PEFT, experts and
# compose, inspecting files outside a repository, typos exiting non-zero.
# The scenarios are tests/test_first_hour.py (marked heavy: minutes under load); this runs them
# and the sentence-transformers checks. Run from the repository root: sh bench/first_hour.sh
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
uptime
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider -m "heavy or not heavy" \
    tests/test_first_hour.py tests/test_sentence_transformers.py "$@"
echo "first hour: passed in $(( $(date +%s) - start )) s"
