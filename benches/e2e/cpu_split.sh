#!/usr/bin/env bash
# Where a saturated accept's CPU goes (BENCHMARKS.md §0): one gateway on a fresh Postgres
# database (Redis, atomic_async at 100 %, shipped provider latencies), 6,000 first accepts
# 64 at a time; the CPU time of the gateway, the load generator, every Postgres backend
# and Redis, read from /proc every 250 ms, over the seconds the accept counter rose.
#   bash benches/e2e/cpu_split.sh            (BIN=path to compare another build;
#                                              LOGDUR=0 logs every statement's duration)
set -euo pipefail
cd "$(dirname "$0")/../.."
PG=${PG:-postgres://postgres@127.0.0.1:5432}
N=${N:-6000}
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; BIN=$PWD/target/release/tripgate; fi
dir=$(realpath -m target/e2e/cpu-split); db=tg_bench_cpu_split
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -qc "CREATE DATABASE $db" \
  -qc "ALTER DATABASE $db SET log_min_duration_statement = ${LOGDUR:--1}"
rm -rf "$dir"; mkdir -p "$dir/flags"
printf '[trip_accept_v2]\npercent = 100\nsalt = "trip_accept_v2"\nallow = []\ndeny = []\n' > "$dir/flags/rollout.toml"
cat > "$dir/config.toml" <<TOML
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
rate_limit_per_driver = 1000
[database]
url = "$PG/$db"
max_connections = 16
[redis]
url = "redis://127.0.0.1:6379"
key_prefix = "bench-cpu-split-$$"
[flags]
path = "$dir/flags/rollout.toml"
[auth]
hs256_secret = "benchmark-secret-0123456789abcdef"
[providers.sms]
kind = "simulated"
latency_ms = 1500
[providers.push]
kind = "simulated"
latency_ms = 800
[jobs]
workers = 1024
[log]
level = "warn"
TOML
(cd "$dir" && exec "$BIN" serve --config config.toml >serve.log 2>&1) & pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf localhost:19090/readyz >/dev/null && break; sleep 0.1; done
python3 - "$pid" "$dir/samples.txt" <<'PY' &
import os, subprocess, sys, time, urllib.request
serve, out = int(sys.argv[1]), open(sys.argv[2], "w")
def ticks(pids):
    t = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
        except OSError:
            pass
    return t
def pids(pattern):
    return [int(x) for x in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]
def accepts():
    try:
        text = urllib.request.urlopen("http://127.0.0.1:19090/metrics", timeout=1).read().decode()
    except OSError:
        return -1
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("tripgate_http_requests_total") and "accept" in l)
while os.path.exists(f"/proc/{serve}"):
    cpu = open("/proc/stat").readline().split()
    out.write(f"{time.time():.2f} {ticks([serve])} {ticks(pids('tripgate drive'))} {ticks(pids('postgres:'))} "
              f"{ticks(pids('redis-server'))} {accepts()} {cpu[4]} {sum(int(x) for x in cpu[1:8])}\n")
    out.flush()
    time.sleep(0.25)
PY
(cd "$dir" && "$BIN" drive --config config.toml --json burst --drivers "$N" --trips "$N" --concurrency 64 > drive.json)
kill $pid; wait $pid 2>/dev/null || true; sleep 0.5
cat "$dir/drive.json"; echo
python3 - "$dir/samples.txt" <<'PY'
import sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
first = rows[0][5]
start = next(i for i, r in enumerate(rows) if r[5] > first + 10)
end = next(i for i in range(start, len(rows)) if rows[i][5] >= max(r[5] for r in rows) - 5)
a, b = rows[start - 1], rows[end]
dt, n = b[0] - a[0], b[5] - a[5]
print(f"window {dt:.2f} s, {n:.0f} accepts, {n / dt:.0f}/s")
for k, name in [(1, "gateway"), (2, "drive"), (3, "postgres"), (4, "redis")]:
    cpu = (b[k] - a[k]) / 100
    print(f"{name:9s} {cpu:5.2f} s CPU = {cpu / dt * 100:3.0f} % of a core, {cpu / n * 1e6:4.0f} us per accept")
print(f"machine idle {(b[6] - a[6]) / (b[7] - a[7]) * 100:.0f} %")
PY
