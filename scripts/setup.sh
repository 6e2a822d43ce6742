#!/usr/bin/env bash
# Sets up everything `make run`, `make test` and `make bench` need: Debian packages (when
# root), a virtual environment in .venv/, torch pinned to the CPU build, the project.
# Idempotent: a stamp holding the hash of the inputs makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.setup-stamp"
EXTRAS="${EXTRAS:-test}"  # make test adds pjsua2 (GPLv2: never installed unasked)
PKG_LIST=scripts/system-packages.txt

# The stamp: the inputs' hash and the extras installed with them. Asking for extras already
# there (make run after make test) is a no-op; new ones are installed beside the old.
want=$(cat pyproject.toml "$0" "$PKG_LIST" | sha256sum | cut -d' ' -f1)
read -r had had_extras < "$STAMP" 2>/dev/null || true
if [ "${had:-}" = "$want" ] && [ -x "$VENV/bin/duplexline" ]; then
    new=$(comm -23 <(tr , '\n' <<< "$EXTRAS" | sort -u) <(tr , '\n' <<< "${had_extras:-}" | sort -u))
    [ -z "$new" ] && exit 0
    EXTRAS="$had_extras,$EXTRAS"
fi
EXTRAS=$(tr , '\n' <<< "$EXTRAS" | sort -u | paste -sd, -)

mapfile -t packages < <(grep -v '^\s*#' "$PKG_LIST" | grep -v '^\s*$')
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: these Debian packages are missing: ${missing[*]}" >&2
        echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
        echo "setup: (continuing; tests that need them will fail with a clear message)" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
$VENV/bin/python -c "import torch" 2>/dev/null || { echo "setup: installing $TORCH_PIN"; $PIP install -q "$TORCH_PIN"; }
echo "setup: installing duplexline and its extras: $EXTRAS"
$PIP install -q -e ".[$EXTRAS]"
echo "$want $EXTRAS" > "$STAMP"
echo "setup: done"
