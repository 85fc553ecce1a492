#!/usr/bin/env bash
# Set up everything this project needs, then run it.
#   bash run.sh train [hydra overrides...]   # python train.py with the given overrides
#   bash run.sh test  [pytest args...]       # the test suite
# Creates .venv (Python 3.11) and installs requirements.txt into it, every transitive package held
# at the version in constraints.txt, then the project itself (pyproject.toml, editable); re-runs skip
# what is done.
set -euo pipefail
cd "$(dirname "$0")"

# ffcv (in requirements.txt) is built from source against OpenCV and libjpeg-turbo, found by pkg-config.
FFCV_DEBS="libopencv-dev libturbojpeg0-dev pkg-config"
install_ffcv_build_deps() {
  local missing="" deb
  for deb in $FFCV_DEBS; do
    dpkg -s "$deb" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$missing $deb"
  done
  [ -z "$missing" ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "note: no apt-get here; install OpenCV and libjpeg-turbo development files and pkg-config with your" \
         "package manager, or building ffcv (pip) fails." >&2
  elif [ "$(id -u)" = 0 ]; then
    echo "Installing ffcv's build dependencies:$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $FFCV_DEBS >/dev/null
  else
    echo "note: not root, so not installing$missing; run: sudo apt-get install -y$missing" >&2
  fi
}

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  install_ffcv_build_deps
  "$VENV/bin/python" -m pip install --quiet pip==26.3
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt -c constraints.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi

what=${1:-train}
shift || true
case "$what" in
  train) exec "$VENV/bin/python" train.py "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh train|test [args...] (got '$what')" >&2; exit 2 ;;
esac
