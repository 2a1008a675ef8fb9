#!/usr/bin/env bash
# Runs every Outpost test on a fresh machine: installs the test peers first (Mosquitto from
# Debian, Python packages into hil-tests/.venv), then `cargo test` over the whole workspace.
# Idempotent: a second run reuses what the first installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# Debian packages the system tests start as real peers.
apt_pkgs=(mosquitto mosquitto-clients)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system broker on port 1883; the tests start their own on
# ephemeral ports and need none.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  $SUDO systemctl stop mosquitto || true
fi

# Python peers (pymodbus, asyncua) and reference implementations (filterpy, imufusion).
venv="$root/hil-tests/.venv"
req="$root/hil-tests/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== creating $venv from $req (pip)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
export OUTPOST_PYTHON="$venv/bin/python"
export OUTPOST_MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

echo "== cargo test --workspace"
cargo test --workspace --locked --no-fail-fast "$@"
