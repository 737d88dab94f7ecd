#!/usr/bin/env bash
# CPU per proxied request (#15, BENCHMARKS.md §0c run 7): tripgate's pass-through and nginx
# as a reverse proxy, both in front of the same upstream, an nginx `return 200` (so that
# only the proxy is in the process measured). CPU time from /proc/<pid>/stat over a
# `wrk -t2 -c64` run. Needs a release build, wrk and nginx (Debian `nginx-light`).
#   bash benches/e2e/proxy_cpu.sh         # BIN=… OUT=… DURATION=6s ROUNDS=2
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${BIN:-target/release/tripgate}")
OUT=$(realpath -m "${OUT:-$(mktemp -d)}")
DURATION=${DURATION:-6s}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT/flags" "$OUT/nginx"
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
url = "http://127.0.0.1:18183"
TOML
cat > "$OUT/nginx/nginx.conf" <<NGINX
worker_processes 2;
daemon off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx/body;
  proxy_temp_path $OUT/nginx/proxy;
  fastcgi_temp_path $OUT/nginx/fastcgi;
  uwsgi_temp_path $OUT/nginx/uwsgi;
  scgi_temp_path $OUT/nginx/scgi;
  upstream fast { server 127.0.0.1:18183; keepalive 64; }
  server { listen 127.0.0.1:18183; location / { default_type application/json; return 200 '{"status":"ok"}'; } }
  server {
    listen 127.0.0.1:18182;
    location / {
      proxy_pass http://fast;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      add_header Via "1.1 nginx";
    }
  }
}
NGINX
"$BIN" serve --config "$OUT/config.toml" > "$OUT/serve.log" 2>&1 &
PID=$!
nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" > "$OUT/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
trap 'kill $PID $NGINX_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:18181/healthz > /dev/null && break; sleep 0.1; done
workers=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
# CPU ticks (user + system) of the processes given.
ticks() { local t=0 p; for p in "$@"; do read -ra s <<< "$(sed 's/.*) //' "/proc/$p/stat")"; t=$((t + s[11] + s[12])); done; echo "$t"; }
hz=$(getconf CLK_TCK)
for _ in $(seq "$ROUNDS"); do
  for target in 18183:"nginx static answer" 18181:"through tripgate" 18182:"through nginx"; do
    port=${target%%:*}
    a=$(ticks "$PID"); b=$(ticks $workers)
    rps=$(wrk -t2 -c64 -d"$DURATION" "http://127.0.0.1:$port/healthz" | awk '/Requests\/sec/ {print $2}')
    a2=$(ticks "$PID"); b2=$(ticks $workers)
    secs=${DURATION%s}
    python3 -c "
r, n = $rps, $rps * $secs
print('%-24s %9.0f requests/s  tripgate %5.1f us/request  nginx %5.1f us/request' % ('${target#*:}', r, ($a2 - $a) * 1e6 / $hz / n, ($b2 - $b) * 1e6 / $hz / n))"
  done
done | tee "$OUT/report.txt"
