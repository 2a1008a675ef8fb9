#!/usr/bin/env bash
# Runs every Outpost test on a fresh machine: installs the test peers first (Mosquitto from
# Debian, Python packages into hil-tests/.venv), then `cargo test` over the whole workspace.
# Idempotent: a second run reuses what the first installed. flap_storm (~14 min, mostly
# waiting) runs beside the rest of the suite, so a cold run takes about as long as the
# longer of the two. Arguments are passed to a plain `cargo test --workspace`.
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

# Python peers (pymodbus) and reference implementations (numpy, filterpy, imufusion).
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

if [ $# -gt 0 ]; then
  echo "== cargo test --workspace $*"
  exec cargo test --workspace --locked --no-fail-fast "$@"
fi

# flap_storm (200 outages of 1-5 s, ~13 min, mostly waiting) runs beside the rest of the
# suite instead of after it, so the whole run takes as long as the longest of the two.
echo "== cargo test --workspace --no-run"
build_log=$(mktemp)
cargo test --workspace --locked --no-run 2>&1 | tee "$build_log"
# The binary the workspace build made (a `-p outpost-hil` build could unify features
# differently and compile it again).
flap_bin=$(sed -n 's/.*Executable tests\/flap_storm.rs (\(.*\))/\1/p' "$build_log" | tail -1)
rm -f "$build_log"
flap_log=$(mktemp)
echo "== flap_storm in the background (log: $flap_log)"
if [ -z "$flap_bin" ]; then
  echo "error: cannot find the flap_storm test binary" >&2
  exit 1
fi
case "$flap_bin" in /*) ;; *) flap_bin="$root/$flap_bin" ;; esac
# As cargo would run it: from the package directory.
(cd "$root/hil-tests" && "$flap_bin") >"$flap_log" 2>&1 &
flap_pid=$!
echo "== cargo test --workspace (flap_storm apart)"
rc=0
cargo test --workspace --locked --no-fail-fast -- --skip two_hundred_short_outages_lose_and_duplicate_nothing || rc=$?
flap_rc=0
wait "$flap_pid" || flap_rc=$?
echo "== flap_storm"
cat "$flap_log"
rm -f "$flap_log"
if [ "$rc" -ne 0 ] || [ "$flap_rc" -ne 0 ]; then
  echo "FAILED: workspace tests exit $rc, flap_storm exit $flap_rc" >&2
  exit 1
fi
