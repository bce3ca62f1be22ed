#!/usr/bin/env bash
# Installs the pods' server stacks (requirements.txt beside this script) into
# a venv, ${PODS_VENV:-/opt/sdgate-pods-venv}, and prints the venv's python
# as its last line. Idempotent: it installs only when the venv is missing or
# was made from another requirements.txt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PODS_VENV:-/opt/sdgate-pods-venv}"
requirements="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
python="$venv/bin/python"

want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    # A fresh venv holds exactly the pinned packages: no httptools nor uvloop
    # (which uvicorn would prefer to the WebUI's h11 and asyncio). The host's
    # pip fills it (pip 22.3 or later: Debian 12 has 23.0), since Debian's
    # python3 lacks ensurepip unless python3-venv is installed.
    python3 -m venv --clear --without-pip "$venv"
    python3 -m pip --python "$python" install --quiet --disable-pip-version-check --no-input \
        -r "$requirements" >&2
    echo "$want" >"$stamp"
fi
echo "$python"
