#!/usr/bin/env bash
# Cross-builds edgeinfer for ARM boards on a Debian/Ubuntu PC, without Docker.
#
#   deploy/build-arm.sh                         # every ARM target, profile `dist`
#   deploy/build-arm.sh aarch64-unknown-linux-gnu
#   deploy/build-arm.sh --profile release x86_64-unknown-linux-gnu
#   deploy/build-arm.sh --no-install ...        # never call apt-get or rustup
#   deploy/build-arm.sh --no-build ...          # only strip and sum binaries cargo already built
#   FEATURES="tls" deploy/build-arm.sh ...      # only these optional features (Cargo.toml [features]);
#   FEATURES="" deploy/build-arm.sh ...         # none at all: the smallest binary; unset: the defaults
#
# Installs what is missing (the rustup targets; the Debian cross gcc and
# binutils, qemu-user), builds each target, and leaves a stripped binary in
# dist/<target>/edgeinfer plus dist/SHA256SUMS. Linkers, C compilers and qemu
# runners for each target are set in .cargo/config.toml. Respects
# CARGO_TARGET_DIR. Prints one line per target: build time and stripped size.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dist
install=1
build=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        --no-install) install=0; shift ;;
        --no-build) build=0; install=0; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "build-arm.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)

# Debian package (cross gcc) and strip program for a target.
cross_pkg() {
    case "$1" in
        aarch64-*) echo gcc-aarch64-linux-gnu ;;
        armv7-*|arm-*) echo gcc-arm-linux-gnueabihf ;;
        *) echo "" ;;
    esac
}
strip_for() {
    case "$1" in
        aarch64-*) echo aarch64-linux-gnu-strip ;;
        armv7-*|arm-*) echo arm-linux-gnueabihf-strip ;;
        *) echo strip ;;
    esac
}

if [ "$install" = 1 ]; then
    need=()
    for t in "${targets[@]}"; do
        p=$(cross_pkg "$t")
        if [ -n "$p" ] && ! command -v "${p#gcc-}-gcc" >/dev/null 2>&1; then need+=("$p"); fi
    done
    command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        echo "installing: ${need[*]}"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # Sorted and unique: two targets may need the same package.
        mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    installed=$(rustup target list --installed)
    for t in "${targets[@]}"; do
        grep -qx "$t" <<<"$installed" || rustup target add "$t"
    done
fi

# FEATURES set (even empty): exactly those optional features instead of the defaults.
feature_args=()
feature_label="default features"
if [ -n "${FEATURES+set}" ]; then
    feature_args=(--no-default-features)
    feature_label="features: ${FEATURES:-none}"
    [ -z "$FEATURES" ] || feature_args+=(--features "$FEATURES")
fi

# Where cargo puts a profile's output: `dev` is in debug/, the rest in their own name.
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug
target_dir=${CARGO_TARGET_DIR:-target}

mkdir -p dist
summary=()
for t in "${targets[@]}"; do
    start=$(date +%s)
    [ "$build" = 0 ] || cargo build --profile "$profile" --target "$t" --bin edgeinfer "${feature_args[@]}"
    secs=$(( $(date +%s) - start ))
    mkdir -p "dist/$t"
    cp "$target_dir/$t/$profile_dir/edgeinfer" "dist/$t/edgeinfer"
    "$(strip_for "$t")" "dist/$t/edgeinfer"
    bytes=$(stat -c %s "dist/$t/edgeinfer")
    summary+=("$(printf '%-34s %6.1f MB  build %4d s' "$t" "$(awk -v b="$bytes" 'BEGIN { print b / 1e6 }')" "$secs")")
done

# One sums file for everything in dist/, paths relative to dist/ (`cd dist && sha256sum -c SHA256SUMS`).
(cd dist && find . -name edgeinfer -type f | sed 's|^\./||' | sort | xargs sha256sum > SHA256SUMS)

echo
echo "dist/ ($profile profile, $feature_label, stripped):"
printf '  %s\n' "${summary[@]}"
echo "  sums: dist/SHA256SUMS"
