#!/usr/bin/env bash
# Builds a plugin-enabled qemu-arm (32-bit ARM linux-user) next to the qemu-aarch64 that
# ../shared/armcost/build-qemu.sh makes, from the same qemu source tree, so that
# benches/int8_isa.py can count armv7 instructions per inference (libinsn). Run once, after
# armcost's set-up; about 10 minutes on 2 cores (the shared objects are already built).
set -euo pipefail
ARMCOST=${ARMCOST:-/tmp/armcost}
src=$ARMCOST/src/qemu-7.2
b=$src/build
[ -d "$b" ] || { echo "no $b: run ../shared/armcost/build-qemu.sh first" >&2; exit 1; }
# Configure again with the arm target added, unless an earlier run did.
if ! grep -q '^build qemu-arm:' "$b/build.ninja"; then
  (cd "$b" && ../configure --target-list=aarch64-linux-user,x86_64-linux-user,arm-linux-user \
     --enable-plugins --disable-system --disable-docs --disable-tools \
     --disable-guest-agent --disable-werror --disable-capstone)
fi
(cd "$b" && nice -n 10 ninja -j"${JOBS:-2}" qemu-arm)
install -m 755 "$b/qemu-arm" "$ARMCOST/qemu/bin/"
"$ARMCOST/qemu/bin/qemu-arm" --version | head -1
