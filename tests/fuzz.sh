#!/usr/bin/env bash
# Fuzz the flags file parser and the driver request decoding with libFuzzer (cargo-fuzz),
# each for a bounded time: bash tests/fuzz.sh [SECONDS per target, default 30].
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 lets the fixed stable toolchain
# accept them. A crash fails the script and leaves its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in flags_file accept_request; do
  cargo fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 2>&1 | tail -n 3
done
