#!/usr/bin/env bash
# Builds Outpost for aarch64 (Raspberry Pi 3/4/5, 64-bit OS) and runs the unit tests under
# qemu-user. Recipe: ../shared/notes/arm.md — Debian's Rust (which ships an arm64 std),
# the aarch64 cross linker, and qemu-aarch64-static as the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for p in rustc-web cargo-web gcc-aarch64-linux-gnu qemu-user-static; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt=1
done
dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  echo "== arm64: installing Debian's Rust with the arm64 std, the cross linker and qemu-user"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user-static >/dev/null
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
# Debian's rustc is another compiler than the host's: keep its artifacts apart.
export CARGO_TARGET_DIR="${OUTPOST_ARM_TARGET_DIR:-target/arm64}"
T=aarch64-unknown-linux-gnu

echo "== arm64: $($RUSTC --version)"
echo "== arm64: release build of outpost ($(date -u +%T))"
cargo build --release --locked --target $T -p outpost
bin="$CARGO_TARGET_DIR/$T/release/outpost"
size=$(stat -c %s "$bin")
echo "== arm64: stripped outpost binary: $size bytes ($((size / 1024 / 1024)) MiB)"
qemu-aarch64-static "$bin" --version

echo "== arm64: $(date -u +%T) unit tests under qemu-aarch64 (release profile: reuses the build above)"
# Skipped under emulation only: a whole-gateway test whose fusion output depends on
# real-time pacing; qemu-user runs ~10x slower and it diverges there. It runs natively in
# the README's test command.
cargo test --locked --release --target $T --workspace --lib --bins -- \
  --skip fusion_actor::tests::kalman_group_output_lands_in_the_outbox
