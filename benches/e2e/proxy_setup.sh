# Sourced by passthrough.sh and proxy_cpu.sh: the processes they compare, started in $OUT
# from $BIN. Ports: the gateway 18181 (admin 18191), nginx's proxy 18182, nginx's static
# answer 18183, the bare proxies of benches/e2e/proxy_floor 18184-18187.

# start_gateway UPSTREAM_URL: `tripgate serve` on SQLite with that pass-through upstream,
# ready; its pid in GATEWAY_PID.
start_gateway() {
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
url = "$1"
TOML
  "$BIN" serve --config "$OUT/config.toml" > "$OUT/serve.log" 2>&1 &
  GATEWAY_PID=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:18191/readyz > /dev/null && break; sleep 0.1; done
}

# start_nginx UPSTREAM_PORT: nginx (2 workers) as a reverse proxy on 18182 to that port, a
# keep-alive pool of 64, the forwarding headers tripgate sets; and a static `return 200`
# on 18183. Its pid in NGINX_PID.
start_nginx() {
  mkdir -p "$OUT/nginx"
  cat > "$OUT/nginx/nginx.conf" <<NGINX
worker_processes 2;
daemon off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  # Keep-alive connections as tripgate keeps them: not closed after nginx's default of 1,000
  # requests (which made wrk reconnect, and a proxy without a pool answer 502).
  keepalive_requests 1000000;
  client_body_temp_path $OUT/nginx/body;
  proxy_temp_path $OUT/nginx/proxy;
  fastcgi_temp_path $OUT/nginx/fastcgi;
  uwsgi_temp_path $OUT/nginx/uwsgi;
  scgi_temp_path $OUT/nginx/scgi;
  upstream backend { server 127.0.0.1:$1; keepalive 64; }
  server { listen 127.0.0.1:18183; location / { default_type application/json; return 200 '{"status":"ok"}'; } }
  server {
    listen 127.0.0.1:18182;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      add_header Via "1.1 nginx";
    }
  }
}
NGINX
  nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" > "$OUT/nginx/stdout.log" 2>&1 &
  NGINX_PID=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:18182/healthz > /dev/null && break; sleep 0.1; done
}

# The bare proxies (benches/e2e/proxy_floor: hyper and hyper-util with nothing of
# tripgate's) in front of UPSTREAM_PORT, built when cargo is there: `pooled` on 18184,
# `axum` on 18185, `same-task` on 18186, `per-core` on 18187. Their pids in FLOOR_PIDS;
# `FLOOR=0` skips them.
FLOOR_PORTS=(18184:pooled 18185:axum 18186:same-task 18187:per-core)
start_floor() {
  FLOOR_PIDS=""
  [ "${FLOOR:-1}" = 0 ] && return 1
  command -v cargo > /dev/null || return 1
  CARGO_TARGET_DIR=target/proxy-floor cargo build -q --release \
    --manifest-path benches/e2e/proxy_floor/Cargo.toml || return 1
  local entry pid
  for entry in "${FLOOR_PORTS[@]}"; do
    target/proxy-floor/release/proxy-floor "${entry#*:}" "127.0.0.1:${entry%%:*}" "127.0.0.1:$1" \
      > "$OUT/floor-${entry#*:}.log" 2>&1 &
    pid=$!
    FLOOR_PIDS="$FLOOR_PIDS $pid"
    for _ in $(seq 50); do curl -sf "http://127.0.0.1:${entry%%:*}/healthz" > /dev/null && break; sleep 0.1; done
    # Not up (its port taken by a leftover of an earlier run, say): no floor rows at all.
    if ! kill -0 "$pid" 2> /dev/null || ! curl -sf "http://127.0.0.1:${entry%%:*}/healthz" > /dev/null; then
      echo "(bare proxy ${entry#*:} did not start on ${entry%%:*}: see $OUT/floor-${entry#*:}.log)" >&2
      kill $FLOOR_PIDS 2> /dev/null || true
      FLOOR_PIDS=""
      return 1
    fi
  done
}
