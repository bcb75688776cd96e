#!/usr/bin/env bash
# Build .venv/annotation-tools, the environment of the annotation tools (labelme, datumaro, Label Studio) that
# the round-trip tests run, from requirements.txt beside this script, and a migrated Label Studio database
# (label-studio-template/) that the server test copies. Does nothing when it is up to date.
# Usage: bash tests/annotation_tools/setup.sh   (from any folder; PYTHON picks the interpreter, default python3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "$here/../.." && pwd)/.venv/annotation-tools"
stamp="$venv/.installed"
if [ -f "$stamp" ] && cmp -s "$here/requirements.txt" "$stamp"; then
  exit 0
fi
test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
log="$venv/pip.log"
if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip &&
       "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "error: installing the annotation tools failed (log: $log)" >&2
  exit 1
fi
"$venv/bin/python" -c "import labelme, datumaro, label_studio, label_studio_sdk"
# Label Studio's database with every migration applied (minutes on a busy machine): each server the tests start
# begins from a copy of it. No version check and no error reports: the tests run without network.
rm -rf "$venv/label-studio-template"
LABEL_STUDIO_BASE_DATA_DIR="$venv/label-studio-template" LATEST_VERSION_CHECK=false SENTRY_DSN= \
  COLLECT_ANALYTICS=false "$venv/bin/label-studio" version >"$venv/label-studio-template.log" 2>&1 ||
  { cat "$venv/label-studio-template.log" >&2; exit 1; }
cp "$here/requirements.txt" "$stamp"
echo "annotation tools installed in $venv"
