#!/usr/bin/env bash
# The runtime-only build (no `onnx` feature), checked on x86 after the test
# command, called by .ci/run. Every other default feature stays on, so no
# dependency changes its features and only edgeinfer itself is rebuilt.
#
# 1. The feature tests run against it: an ONNX model is refused by `check` and
#    `run` naming the `onnx` feature (tests/it/features.rs).
# 2. The full binary converts a model, as a user's PC would; the runtime-only
#    binary must print exactly what the full binary prints for the ONNX file,
#    loads the ONNX file from a cache entry the full build wrote, and refuses
#    the ONNX file without one, naming the feature.
#
# Prints the path of a copy of the full binary (for the .deb check), which the
# runtime-only build replaces in target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
out=${1:?usage: runtime-only.sh DIR}
mkdir -p "$out"
full=$out/edgeinfer-full
cp "$target_dir/debug/edgeinfer" "$full"
grep -q '^features: onnx' <<<"$("$full" --version)" || { echo "FAIL: $full is not the default build" >&2; exit 1; }

features=broker,v4l2,http-source,serial,tls,threads,http-server,model-fetch
cargo test --no-default-features --features "$features" --test it -- features:: >&2
min=$out/edgeinfer-runtime-only
cp "$target_dir/debug/edgeinfer" "$min"
grep -q '^left out: onnx$' <<<"$("$min" --version)" || { "$min" --version >&2; echo "FAIL: onnx still built in" >&2; exit 1; }

"$full" convert models/digits_cnn_int8.onnx -o "$out/digits_cnn_int8.nnef.tgz" >&2
infer() { "$@" models/samples/digits --top-k 3 --labels models/digits.labels.txt | sed 's/,"inference_ms":[0-9.e-]*//'; }
want=$(infer "$full" infer models/digits_cnn_int8.onnx)
got=$(infer "$min" infer "$out/digits_cnn_int8.nnef.tgz")
n=$(grep -c '"top"' <<<"$got" || true)
[ "$n" -ge 4 ] || { echo "FAIL: the runtime-only binary classified nothing: $got" >&2; exit 1; }
[ "$want" = "$got" ] || { diff <(echo "$want") <(echo "$got") >&2; echo "FAIL: converted model differs" >&2; exit 1; }
echo "runtime-only binary on the converted model: the same $n results as the full binary on the ONNX file" >&2
# An ONNX model whose start-up cache entry the full build wrote loads without the parser.
want=$(infer "$full" infer models/digits_cnn_int8.onnx --cache-dir "$out/cache")
got=$(infer "$min" infer models/digits_cnn_int8.onnx --cache-dir "$out/cache")
[ "$want" = "$got" ] || { diff <(echo "$want") <(echo "$got") >&2; echo "FAIL: cached ONNX model differs" >&2; exit 1; }
echo "runtime-only binary on the ONNX file with the full build's cache entry: the same results" >&2
if msg=$("$min" infer models/digits_cnn_int8.onnx models/samples/digits 2>&1); then
    echo "FAIL: the runtime-only binary accepted an ONNX model" >&2; exit 1
fi
grep -q 'needs edgeinfer built with the `onnx` feature' <<<"$msg" || { echo "$msg" >&2; echo "FAIL: no feature named" >&2; exit 1; }
echo "runtime-only binary on the ONNX file: refused, naming the \`onnx\` feature" >&2
echo "$full"
