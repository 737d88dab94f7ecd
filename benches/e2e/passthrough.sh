#!/usr/bin/env bash
# Pass-through overhead (#15): wrk against a fast upstream — the gateway's own admin
# `/healthz` — directly, and through the gateway's pass-through (`upstream.url` = the admin
# listener), in the same run. Needs a release build and `wrk` (Debian package).
# With nginx installed (Debian `nginx-light`), the same upstream is also reached through
# nginx as a reverse proxy (2 workers, a keep-alive pool of 64, the same forwarding
# headers): a same-machine proxy reference, since a proxy does the socket work of both
# sides on the cores wrk and the upstream also use. With cargo, the bare proxies of
# benches/e2e/proxy_floor (hyper and hyper-util alone) are measured too: the floor of
# tripgate's own stack (`FLOOR=0` skips them).
#   bash benches/e2e/passthrough.sh            # OUT=/tmp/passthrough to keep the files
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/tripgate}
OUT=${OUT:-$(mktemp -d)}
DURATION=${DURATION:-10s}
mkdir -p "$OUT"
: > "$OUT/report.txt"
source benches/e2e/proxy_setup.sh
GATEWAY_PID="" NGINX_PID="" FLOOR_PIDS=""
trap 'kill $GATEWAY_PID $NGINX_PID $FLOOR_PIDS 2>/dev/null || true' EXIT
start_gateway http://127.0.0.1:18191
direct=http://127.0.0.1:18191/healthz
via=http://127.0.0.1:18181/healthz
curl -sf "$via" > /dev/null   # warm the pool
targets=("$direct" "$via")
if command -v nginx >/dev/null; then
  start_nginx 18191
  targets+=(http://127.0.0.1:18182/healthz)
else
  echo "(nginx not installed: no same-machine proxy reference; apt-get install nginx-light)" | tee -a "$OUT/report.txt"
fi
if start_floor 18191; then
  for entry in "${FLOOR_PORTS[@]}"; do targets+=("http://127.0.0.1:${entry%%:*}/healthz"); done
fi
echo "== sequential (1 connection): latency" | tee -a "$OUT/report.txt"
for target in "${targets[@]}"; do
  echo "-- $target" | tee -a "$OUT/report.txt"
  wrk -t1 -c1 -d"$DURATION" --latency "$target" | grep -E "Latency|50%|90%|99%|Requests/sec|Non-2xx|Socket errors" | tee -a "$OUT/report.txt"
done
echo "== saturation (2 threads, 64 connections)" | tee -a "$OUT/report.txt"
declare -A saturated
for target in "${targets[@]}"; do
  echo "-- $target" | tee -a "$OUT/report.txt"
  wrk -t2 -c64 -d"$DURATION" --latency "$target" | grep -E "Latency|50%|99%|Requests/sec|Non-2xx|Socket errors" | tee "$OUT/wrk.txt" >> "$OUT/report.txt"
  cat "$OUT/wrk.txt"
  saturated[$target]=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk.txt")
done
echo "== saturation, each ÷ direct" | tee -a "$OUT/report.txt"
for target in "${targets[@]}"; do
  python3 -c "print('-- $target  %.2f' % (${saturated[$target]} / ${saturated[$direct]}))" | tee -a "$OUT/report.txt"
done
if command -v oha >/dev/null; then
  # Paced (wrk2-style, with latency correction): a fixed RATE requests/s over 32 connections.
  RATE=${RATE:-2000}
  echo "== paced at $RATE requests/s (oha, latency-corrected)" | tee -a "$OUT/report.txt"
  for target in "${targets[@]}"; do
    oha -z "$DURATION" -q "$RATE" -c 32 --latency-correction --no-tui --output-format json "$target" > "$OUT/oha.json"
    python3 -c "import json,sys; d=json.load(open('$OUT/oha.json')); p=d['latencyPercentiles']; print('-- $target  p50 %.3f ms  p99 %.3f ms  rps %.0f' % (p['p50']*1000, p['p99']*1000, d['summary']['requestsPerSec']))" | tee -a "$OUT/report.txt"
  done
else
  echo "(oha not installed: no paced run; cargo install oha)" | tee -a "$OUT/report.txt"
fi
echo "files in $OUT"
