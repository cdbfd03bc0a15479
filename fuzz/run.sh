#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600) and prints, per target,
# the executions, coverage and crashes. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Crashes land in fuzz/artifacts/<target>/;
# each one found becomes a regression test in the normal suite (tests/it/fuzz_regressions.rs).
#
#   fuzz/run.sh 600              # 10 minutes per target
#   fuzz/run.sh 5 config frame   # named targets only (CI runs every target for a few seconds)
set -euo pipefail
# Where the CLI is built (for the converted-model seeds), made absolute before the cd.
target=$(realpath -m "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(config payload command multipart frame disk_queue onnx converted)
fi
bin=$target/release/edgeinfer
[ -x "$bin" ] || bin=$target/debug/edgeinfer
if [ -x "$bin" ]; then python3 seeds.py "$bin"; else python3 seeds.py; fi
mkdir -p logs
summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  # -rss_limit_mb/-malloc_limit_mb: a length field that asks for gigabytes is a finding.
  # -timeout: an input that takes over 10 s (an endless loop) is a finding too.
  set +e
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
    -max_len=$([ "$t" = onnx ] || [ "$t" = converted ] && echo 400000 || echo 65536) \
    -print_final_stats=1 >"logs/$t.log" 2>&1
  rc=$?
  set -e
  after=$(find "artifacts/$t" -type f | wc -l)
  # No match (a build that failed, a seed that crashed at once) must not end the script.
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -n1 || true)
  cov=$(grep -oE '(DONE|pulse|NEW|REDUCE|INITED) +cov: [0-9]+ ft: [0-9]+' "logs/$t.log" | tail -n1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
  corpus=$(find "corpus/$t" -type f | wc -l)
  new=$((after - before))
  [ "$rc" -eq 0 ] || status=1
  summary+=("$(printf '%-11s %12s execs  %-20s corpus %6s  new crashes %s  (exit %s)' "$t" "${execs:-?}" "${cov:-cov: ?}" "$corpus" "$new" "$rc")")
  echo "${summary[-1]}"
done
echo
echo "fuzz summary ($secs s per target; logs in fuzz/logs/, crashes in fuzz/artifacts/):"
printf '%s\n' "${summary[@]}"
exit $status
