#!/usr/bin/env bash
# Set up everything this project needs, then run it.
#   bash run.sh train [hydra overrides...]   # python train.py with the given overrides
#   bash run.sh test  [pytest args...]       # the test suite
# Creates .venv (Python 3.11) and installs requirements.txt into it; re-runs skip what is done.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
fi

what=${1:-train}
shift || true
case "$what" in
  train) exec "$VENV/bin/python" train.py "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh train|test [args...] (got '$what')" >&2; exit 2 ;;
esac
