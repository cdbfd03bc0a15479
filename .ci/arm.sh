#!/usr/bin/env bash
# ARM part of CI, called by .ci/run: cross-builds aarch64-gnu, armv7-gnueabihf
# and aarch64-musl (Debian cross gcc, no Docker), runs a named test subset under
# qemu-user on Pi-like CPUs (Cortex-A72 for aarch64: no SVE; Cortex-A7 with NEON
# forced for armv7, as qemu-user shows the host's /proc/cpuinfo), prints which
# tract kernels ran, then checks the systemd unit and the .deb packages, and
# builds the container image where podman works. Every step is timed.
#
# The subset: model parity with ONNX Runtime on every shipped model, the pure
# unit tests (config parsing, tensors, pre/postprocessing, sd_notify), and the
# daemon end to end against a real mosquitto (the x86 broker, spawned by the ARM
# test binary; the ARM daemon is started through EDGEINFER_RUNNER=qemu-...).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

t0=$(date +%s)
step_start=$t0
timings=()
step() {
    local now
    now=$(date +%s)
    [ -n "${step_name:-}" ] && timings+=("$(printf '%5d s  %s' $((now - step_start)) "$step_name")")
    step_name="$1"
    step_start=$now
    [ -n "$1" ] && echo "=== [$((now - t0)) s] $1"
    return 0
}

step "install cross toolchains (apt, rustup)"
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need+=(gcc-arm-linux-gnueabihf)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl

target_dir=${CARGO_TARGET_DIR:-target}
# No LTO, opt-level 0 except where the qemu tests spend their time (tract-linalg
# at 3; tract-core, tract-data, ndarray at 1): Cargo.toml [profile.ci-arm] has
# the measured build times. The same results, half the compile time of opt-level
# 1. Shipped binaries come from deploy/build-arm.sh (profile `dist`).
profile=ci-arm
# The optional features the ARM tests and packages need: the ONNX parser, the
# embedded broker (the packaged config uses it) and TLS (ring must cross-build
# with just the cross gcc) and `threads` (tract's rayon pool: the tests check
# that our operators give the same bits on 1 and 4 threads, as on a Pi's 4
# cores) and `http-server` (the status page and /metrics: its axum comes with
# the broker anyway). V4L2, the HTTP camera and serial sources are left out: x86 tests
# them, and each would be compiled once more per ARM target.
feature_list=onnx,broker,tls,threads,http-server
features=(--no-default-features --features "$feature_list")
# Unit tests that hold pure, arch-sensitive logic (numbers, parsing), the
# start-up cache's streamed reader (threads, weights read into tensors: what a
# board with `cache_dir` runs at every start), plus the integration subset. The fetched detector must be present (.ci/run fetches it).
lib_filters=(config:: tensor:: preprocess:: postprocess:: payload:: sdnotify:: engine::rewrite:: engine::quant_dequant:: engine::dyn_quant:: engine::depthwise:: engine::converted:: engine::int8_conv:: engine::pointwise:: engine::isa::
    engine::tests::threads_above_one_need_the_threads_feature
    engine::tests::loading_runs_depthwise_convolutions_on_our_operator
    engine::tests::cached_int8_models_run_convolutions_on_integer_kernels_too)
it_filters=(parity:: daemon::files_source_publishes_what_infer_gives_in_order systemd::
    audio::silero_sequence_model_runs_in_tract_like_onnxruntime
    detect::engine_matches_onnxruntime_on_the_reference_input)

# qemu command that runs one ARM binary the way .cargo/config.toml's runner does.
runner_for() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu" ;;
        aarch64-unknown-linux-musl) echo "qemu-aarch64 -cpu cortex-a72" ;;
        armv7-unknown-linux-gnueabihf) echo "qemu-arm -cpu cortex-a7 -L /usr/arm-linux-gnueabihf" ;;
    esac
}

# Which kernels tract picks on the emulated CPU, from its own log lines: on the
# float model, whose products tract always runs (an int8 model's may all be on
# our integer kernels).
show_kernels() {
    local target=$1 bin=$2 log
    log=$(RUST_LOG=tract_linalg=debug TRACT_CPU_AARCH64_KIND=cortex-a72 TRACT_CPU_ARM32_NEON=true \
        $(runner_for "$target") "$bin" infer models/digits_cnn_f32.onnx models/samples/digits 2>&1 >/dev/null)
    echo "$log" | grep -E 'CPU optimisation|ISA:|mmm tiers|SVE' | sed "s/^.*tract_linalg[^]]*] /  [$target] tract: /"
    case "$target" in
        aarch64-*)
            if grep -q 'sve' <<<"$log"; then echo "FAIL: SVE kernels on a Cortex-A72 (no Pi has SVE)"; exit 1; fi
            grep -q 'mmm tiers for aarch64: arm64simd' <<<"$log" || { echo "FAIL: arm64simd (NEON) kernels not chosen"; exit 1; } ;;
        armv7-*)
            grep -q 'armv7neon' <<<"$log" || { echo "FAIL: armv7 NEON kernels not chosen"; exit 1; } ;;
    esac
}

# The unit as shipped, with ExecStart pointed at an executable that exists here
# (verify checks it), must pass `systemd-analyze verify` without a word, and
# stay at a low exposure level.
check_unit() {
    local dir msgs
    dir=$(mktemp -d)
    install -m 0755 /bin/true "$dir/edgeinfer"
    sed "s|/usr/bin/edgeinfer|$dir/edgeinfer|g" deploy/edgeinfer.service > "$dir/edgeinfer.service"
    msgs=$(systemd-analyze verify "$dir/edgeinfer.service" 2>&1) || { echo "$msgs"; echo "FAIL: systemd-analyze verify"; exit 1; }
    [ -z "$msgs" ] || { echo "$msgs"; echo "FAIL: systemd-analyze verify printed warnings"; exit 1; }
    echo "systemd-analyze verify: ok"
    # --threshold is in tenths: 30 = exposure 3.0 ("OK" ends at 4.9).
    systemd-analyze security --offline=yes --threshold=30 "$dir/edgeinfer.service" | tail -1
    rm -rf "$dir"
}

# Builds the .deb for a target from a binary, shows its metadata and contents,
# installs it into an empty scratch root with dpkg, checks files, owners and
# modes, runs the installed binary's `check` on the installed config and models,
# verifies the installed unit, then purges it.
check_deb() {
    local target=$1 bin=$2 deb root tmp runner bad
    deb=$(bash deploy/make-deb.sh --bin "$bin" "$target")
    echo "$deb"
    deb=${deb%% *}
    dpkg-deb --info "$deb"
    dpkg-deb --contents "$deb" | awk '{ print "  " $1, $2, $6 }'
    root=$(mktemp -d)
    tmp=$(mktemp -d)
    mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
    touch "$root/var/lib/dpkg/status"
    # Foreign architecture and no libc6 in the empty root: forced. Maintainer
    # scripts run outside the root with DPKG_ROOT set, so they leave systemd alone.
    dpkg --root="$root" --log=/dev/null --force-architecture --force-depends --force-script-chrootless -i "$deb" >/dev/null
    dpkg --root="$root" -s edgeinfer | grep -q '^Status: install ok installed' || { echo "FAIL: not installed"; exit 1; }
    for f in usr/bin/edgeinfer:755 lib/systemd/system/edgeinfer.service:644 etc/edgeinfer/edgeinfer.toml:644 \
        usr/share/edgeinfer/models:755 usr/share/edgeinfer/models/digits_cnn_int8.onnx:644 \
        usr/share/edgeinfer/models/vibration_int8.onnx:644 usr/share/edgeinfer/models/samples/digits:755 \
        usr/share/doc/edgeinfer/DEPLOY.md:644; do
        local path=${f%%:*} mode=${f##*:} got
        got=$(stat -c '%a %U:%G' "$root/$path" 2>/dev/null) || { echo "FAIL: $path missing"; exit 1; }
        [ "$got" = "$mode root:root" ] || { echo "FAIL: $path is $got, want $mode root:root"; exit 1; }
    done
    bad=$(find "$root" -path "$root/var/lib/dpkg" -prune -o \( ! -type l -perm -o+w -o ! -user root \) -print | grep -v "^$root\$" || true)
    [ -z "$bad" ] || { echo "FAIL: world-writable or not root-owned: $bad"; exit 1; }
    grep -qx /etc/edgeinfer/edgeinfer.toml "$root/var/lib/dpkg/info/edgeinfer.conffiles" || { echo "FAIL: config is not a conffile"; exit 1; }
    # The packaged config must load the packaged models with the packaged binary.
    sed "s|/usr/share/edgeinfer|$root/usr/share/edgeinfer|g" "$root/etc/edgeinfer/edgeinfer.toml" > "$tmp/edgeinfer.toml"
    runner=$(runner_for "$target")
    TRACT_CPU_ARM32_NEON=true $runner "$root/usr/bin/edgeinfer" check "$tmp/edgeinfer.toml"
    sed "s|/usr/bin/edgeinfer|$root/usr/bin/edgeinfer|g" "$root/lib/systemd/system/edgeinfer.service" > "$tmp/edgeinfer.service"
    systemd-analyze verify "$tmp/edgeinfer.service"
    dpkg --root="$root" --log=/dev/null --force-script-chrootless --purge edgeinfer >/dev/null
    [ ! -e "$root/usr/bin/edgeinfer" ] && [ ! -e "$root/etc/edgeinfer/edgeinfer.toml" ] || { echo "FAIL: purge left files"; exit 1; }
    echo "$deb: installs, checks and purges cleanly"
    rm -rf "$root" "$tmp"
}

# The container image from the prebuilt static binary, where podman can build
# and run images on this machine (rootful podman in a container often cannot).
check_container() {
    command -v podman >/dev/null 2>&1 ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null 2>&1 || true
    if ! command -v podman >/dev/null 2>&1; then
        echo "container: podman cannot be installed here; skipped (DEPLOY.md has the recipe)"
        return 0
    fi
    if ! podman build -q -f deploy/Containerfile --platform linux/arm64 \
        --build-arg TARGET=aarch64-unknown-linux-musl -t edgeinfer-ci:arm64 . ; then
        echo "container: podman build does not work here; skipped"
        return 0
    fi
    local mnt
    mnt=$(podman image mount edgeinfer-ci:arm64)
    TRACT_CPU_AARCH64_KIND=cortex-a72 qemu-aarch64 -cpu cortex-a72 "$mnt/usr/bin/edgeinfer" infer \
        "$mnt/usr/share/edgeinfer/models/digits_cnn_int8.onnx" "$mnt/usr/share/edgeinfer/models/samples/digits" --top-k 1
    podman image unmount edgeinfer-ci:arm64 >/dev/null
    podman image inspect edgeinfer-ci:arm64 --format 'image user {{.Config.User}}, {{.Size}} bytes'
    [ "$(podman image inspect edgeinfer-ci:arm64 --format '{{.Config.User}}')" = 65532:65532 ] ||
        { echo "FAIL: image does not run as the non-root user"; exit 1; }
    podman rmi edgeinfer-ci:arm64 >/dev/null
}

step "build aarch64-gnu and armv7 ($profile, ${features[*]}): tests and binaries"
# One cargo invocation for both targets: each target's build has long
# single-crate stretches (tract-core), which the other target's crates fill on
# the second core. The test runs below then find everything built.
cargo test --profile "$profile" --no-run --lib --test it "${features[@]}" \
    --target aarch64-unknown-linux-gnu --target armv7-unknown-linux-gnueabihf
step "build aarch64-musl ($profile): the static binary only"
cargo build --profile "$profile" --bin edgeinfer "${features[@]}" --target aarch64-unknown-linux-musl

for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    step "$target: test subset under $(runner_for "$target" | cut -d' ' -f1-3)"
    # Both rungs under test are `neon`: SMLAL on the Cortex-A72, VMLAL on the Cortex-A7.
    expect=neon
    EDGEINFER_RUNNER=$(runner_for "$target") EDGEINFER_EXPECT_ISA=$expect \
        cargo test --profile "$profile" --target "$target" --lib --test it "${features[@]}" -- --nocapture "${lib_filters[@]}" "${it_filters[@]}"
    step "$target: kernels"
    show_kernels "$target" "$target_dir/$target/$profile/edgeinfer"
done

# Our int8 kernels on the other aarch64 rung: the subset above ran SMLAL on the
# Cortex-A72 (Pi 4, no dot product); this runs SDOT on the Cortex-A76 (Pi 5),
# where the int8 operators (and the integer depthwise loops) are in graphs, so
# the models' parity with ONNX Runtime is checked here too.
# Each run asserts the rung it must detect (EDGEINFER_EXPECT_ISA), so neither
# can pass by skipping.
for cpu_isa in cortex-a76:dotprod; do
    cpu=${cpu_isa%%:*}
    step "aarch64-unknown-linux-gnu: int8 kernels under qemu -cpu $cpu"
    EDGEINFER_EXPECT_ISA=${cpu_isa##*:} \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="env TRACT_CPU_AARCH64_KIND=$cpu qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
        cargo test --profile "$profile" --target aarch64-unknown-linux-gnu --lib --test it "${features[@]}" -- --nocapture \
        engine::isa:: engine::int8_conv:: engine::depthwise:: parity:: \
        engine::tests::loading_runs_depthwise_convolutions_on_our_operator \
        engine::tests::cached_int8_models_run_convolutions_on_integer_kernels_too
done

step "aarch64-unknown-linux-musl: static binary smoke run"
musl_bin="$target_dir/aarch64-unknown-linux-musl/$profile/edgeinfer"
if aarch64-linux-gnu-readelf -l "$musl_bin" | grep -q INTERP; then echo "FAIL: musl binary is not static"; exit 1; fi
# Static: runs under qemu without any ARM sysroot.
out=$(TRACT_CPU_AARCH64_KIND=cortex-a72 qemu-aarch64 -cpu cortex-a72 "$musl_bin" infer models/digits_cnn_int8.onnx \
    models/samples/digits --top-k 1)
echo "$out"
[ "$(grep -c '"top"' <<<"$out")" -ge 4 ] || { echo "FAIL: musl binary did not classify the samples"; exit 1; }
step "aarch64-unknown-linux-musl: kernels"
show_kernels aarch64-unknown-linux-musl "$musl_bin"

step "dist: strip and checksum ($profile profile)"
# The binaries the tests ran.
FEATURES=$feature_list bash deploy/build-arm.sh --no-build --profile "$profile" \
    aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl

step "systemd unit: systemd-analyze verify and security"
check_unit

step ".deb packages: build, inspect, install into scratch roots"
# The amd64 package checks the packaging, not the code: it takes the binary the
# x86 tests built (`cargo test` in .ci/run); EDGEINFER_HOST_BIN names another.
host_bin=${EDGEINFER_HOST_BIN:-$target_dir/debug/edgeinfer}
[ -x "$host_bin" ] || cargo build --bin edgeinfer
check_deb aarch64-unknown-linux-gnu "dist/aarch64-unknown-linux-gnu/edgeinfer"
check_deb armv7-unknown-linux-gnueabihf "dist/armv7-unknown-linux-gnueabihf/edgeinfer"
check_deb x86_64-unknown-linux-gnu "$host_bin"

step "container image (podman, if it works here)"
check_container

step ""
echo
echo "ARM CI timings:"
printf '  %s\n' "${timings[@]}"
echo "  total $(($(date +%s) - t0)) s"
