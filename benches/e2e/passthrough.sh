#!/usr/bin/env bash
# Pass-through overhead (#15): wrk against a fast upstream — the gateway's own admin
# `/healthz` — directly, and through the gateway's pass-through (`upstream.url` = the admin
# listener), in the same run. Needs a release build and `wrk` (Debian package).
#   bash benches/e2e/passthrough.sh            # OUT=/tmp/passthrough to keep the files
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/tripgate}
OUT=${OUT:-$(mktemp -d)}
DURATION=${DURATION:-10s}
mkdir -p "$OUT/flags"
printf '[trip_accept_v2]\npercent = 0\n' > "$OUT/flags/rollout.toml"
cat > "$OUT/config.toml" <<TOML
[server]
listen = "127.0.0.1:18181"
admin_listen = "127.0.0.1:18191"
[database]
url = "sqlite://$OUT/t.db"
[auth]
hs256_secret = "passthrough-bench-secret-0123"
[flags]
path = "$OUT/flags/rollout.toml"
[log]
level = "warn"
[upstream]
url = "http://127.0.0.1:18191"
TOML
"$BIN" serve --config "$OUT/config.toml" > "$OUT/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:18191/readyz > /dev/null && break; sleep 0.1; done
direct=http://127.0.0.1:18191/healthz
via=http://127.0.0.1:18181/healthz
curl -sf "$via" > /dev/null   # warm the pool
echo "== sequential (1 connection): latency" | tee "$OUT/report.txt"
for target in "$direct" "$via"; do
  echo "-- $target" | tee -a "$OUT/report.txt"
  wrk -t1 -c1 -d"$DURATION" --latency "$target" | grep -E "Latency|50%|90%|99%|Requests/sec" | tee -a "$OUT/report.txt"
done
echo "== saturation (2 threads, 64 connections)" | tee -a "$OUT/report.txt"
for target in "$direct" "$via"; do
  echo "-- $target" | tee -a "$OUT/report.txt"
  wrk -t2 -c64 -d"$DURATION" --latency "$target" | grep -E "Latency|50%|99%|Requests/sec" | tee -a "$OUT/report.txt"
done
if command -v oha >/dev/null; then
  # Paced (wrk2-style, with latency correction): a fixed RATE requests/s over 32 connections.
  RATE=${RATE:-2000}
  echo "== paced at $RATE requests/s (oha, latency-corrected)" | tee -a "$OUT/report.txt"
  for target in "$direct" "$via"; do
    oha -z "$DURATION" -q "$RATE" -c 32 --latency-correction --no-tui --output-format json "$target" > "$OUT/oha.json"
    python3 -c "import json,sys; d=json.load(open('$OUT/oha.json')); p=d['latencyPercentiles']; print('-- $target  p50 %.3f ms  p99 %.3f ms  rps %.0f' % (p['p50']*1000, p['p99']*1000, d['summary']['requestsPerSec']))" | tee -a "$OUT/report.txt"
  done
else
  echo "(oha not installed: no paced run; cargo install oha)" | tee -a "$OUT/report.txt"
fi
echo "files in $OUT"
