#!/usr/bin/env bash
# CPU per proxied request (#15, BENCHMARKS.md §0c run 7): tripgate's pass-through and nginx
# as a reverse proxy, both in front of the same upstream, an nginx `return 200` (so that
# only the proxy is in the process measured). CPU time from /proc/<pid>/stat over a
# `wrk -t2 -c64` run. Needs a release build, wrk and nginx (Debian `nginx-light`). With
# cargo, the bare proxies of benches/e2e/proxy_floor (hyper and hyper-util alone, the floor
# of tripgate's stack) in front of the same upstream too: "bare …" rows, their CPU in the
# tripgate column (`FLOOR=0` skips them).
#   bash benches/e2e/proxy_cpu.sh         # BIN=… OUT=… DURATION=6s ROUNDS=2
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${BIN:-target/release/tripgate}")
OUT=$(realpath -m "${OUT:-$(mktemp -d)}")
DURATION=${DURATION:-6s}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
source benches/e2e/proxy_setup.sh
GATEWAY_PID="" NGINX_PID="" FLOOR_PIDS=""
trap 'kill $GATEWAY_PID $NGINX_PID $FLOOR_PIDS 2>/dev/null || true' EXIT
start_gateway http://127.0.0.1:18183
start_nginx 18183
workers=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
# CPU ticks (user + system) of the processes given.
ticks() { local t=0 p; for p in "$@"; do read -ra s <<< "$(sed 's/.*) //' "/proc/$p/stat")"; t=$((t + s[11] + s[12])); done; echo "$t"; }
hz=$(getconf CLK_TCK)
secs=${DURATION%s}
# The bare proxies of benches/e2e/proxy_floor, when cargo is there: "bare <mode>" rows,
# their own CPU in the tripgate column.
floor=()
if start_floor 18183; then
  read -ra floor_pids <<< "$FLOOR_PIDS"
  for i in "${!FLOOR_PORTS[@]}"; do floor+=("${FLOOR_PORTS[$i]%%:*}:${floor_pids[$i]}:bare ${FLOOR_PORTS[$i]#*:}"); done
fi
for _ in $(seq "$ROUNDS"); do
  for target in 18183:"$GATEWAY_PID":"nginx static answer" 18181:"$GATEWAY_PID":"through tripgate" \
    18182:"$GATEWAY_PID":"through nginx" "${floor[@]}"; do
    port=${target%%:*} rest=${target#*:}
    pid=${rest%%:*} name=${rest#*:}
    a=$(ticks "$pid"); b=$(ticks $workers)
    out=$(wrk -t2 -c64 -d"$DURATION" "http://127.0.0.1:$port/healthz")
    a2=$(ticks "$pid"); b2=$(ticks $workers)
    rps=$(awk '/Requests\/sec/ {print $2}' <<< "$out")
    # Failed answers are cheap ones: a row with any is marked, not silently counted.
    failed=$(grep -E "Non-2xx|Socket errors" <<< "$out" | tr -s ' ' | paste -sd ';' || true)
    python3 -c "
r, n = $rps, $rps * $secs
print('%-24s %9.0f requests/s  tripgate %5.1f us/request  nginx %5.1f us/request%s' % ('$name', r, ($a2 - $a) * 1e6 / $hz / n, ($b2 - $b) * 1e6 / $hz / n, '  FAILED ANSWERS:$failed' if '$failed' else ''))"
  done
done | tee "$OUT/report.txt"
