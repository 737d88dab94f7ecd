#!/usr/bin/env bash
# End-to-end benchmarks of BENCHMARKS.md, one command:  bash benches/e2e/run.sh
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and Redis on 127.0.0.1:6379,
# pgbench and redis-benchmark. Builds the release binary, runs `tripgate serve` on a fresh
# database, drives each scenario with `tripgate drive --json`, measures the storage limit
# with pgbench and redis-benchmark in the same run, and prints every report.
# Env: SCENARIOS (default "compare burst-pg burst-sqlite saturation"; also "hot-path", the
# accept against the minimal fence transaction; "jobs"; "shards", one database vs two
# shards: see BENCHMARKS.md; "cpu-split", each process's CPU per accept at saturation;
# "idle", 1,000 sequential first accepts alone),
# OUT (default target/e2e), BIN (another build's binary instead of building this one),
# LOGDUR (log_min_duration_statement on the gateway's fresh databases, e.g. 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS:-redis://127.0.0.1:6379}
OUT=$(realpath -m "${OUT:-target/e2e}")
SCENARIOS=${SCENARIOS:-"compare burst-pg burst-sqlite saturation"}
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; BIN=$PWD/target/release/tripgate; fi

serve_pid=""
stop() { [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null; serve_pid=""; }
trap stop EXIT

# start NAME DB_URL REDIS_URL PERCENT SMS_MS PUSH_MS [SHARD_URL...]
start() {
  local name=$1 db=$2 redis=$3 percent=$4 sms=$5 push=$6 dir="$OUT/$1" shards=""
  for url in "${@:7}"; do shards="$shards${shards:+, }\"$url\""; done
  rm -rf "$dir"; mkdir -p "$dir/flags"
  printf '[trip_accept_v2]\npercent = %s\nsalt = "trip_accept_v2"\nallow = []\ndeny = []\n' "$percent" > "$dir/flags/rollout.toml"
  cat > "$dir/config.toml" <<TOML
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
rate_limit_per_driver = 1000
[database]
url = "$db"
max_connections = 16
shards = [$shards]
[redis]
url = "$redis"
key_prefix = "bench-$name-$$"
[flags]
path = "$dir/flags/rollout.toml"
[auth]
hs256_secret = "benchmark-secret-0123456789abcdef"
[providers.sms]
kind = "simulated"
latency_ms = $sms
[providers.push]
kind = "simulated"
latency_ms = $push
[jobs]
workers = 1024
[log]
level = "warn"
TOML
  (cd "$dir" && exec "$BIN" serve --config config.toml >serve.log 2>&1) &
  serve_pid=$!
  for _ in $(seq 1 100); do curl -sf localhost:19090/readyz >/dev/null && return 0; sleep 0.1; done
  echo "gateway did not start"; cat "$dir/serve.log"; exit 1
}

fresh_pg() {
  local db="tg_bench_$1"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -qc "CREATE DATABASE $db"
  if [ -n "${LOGDUR:-}" ]; then psql "$PG/postgres" -qc "ALTER DATABASE $db SET log_min_duration_statement = $LOGDUR"; fi
  echo "$PG/$db"
}
drive() { local name=$1; shift; (cd "$OUT/$name" && "$BIN" drive --config config.toml --json "$@") | tee "$OUT/$name-$1.json"; echo; }

for s in $SCENARIOS; do
  case $s in
    compare)  # legacy vs atomic_async, shipped provider latencies, 50 % rollout, Postgres + Redis
      start compare "$(fresh_pg compare)" "$REDIS" 50 1500 800
      drive compare steady --rate 10 --duration 60
      drive compare race --drivers 5 --trips 20
      stop ;;
    burst-pg)  # 1,000 drivers x 1,000 trips at once, atomic_async, Postgres + Redis
      start burst-pg "$(fresh_pg burst)" "$REDIS" 100 1500 800
      drive burst-pg burst --drivers 1000 --trips 1000
      stop ;;
    burst-sqlite)  # the same on the embedded default
      # A fresh file each run (OUT is absolute: sqlite:///abs/path).
      rm -f "$OUT"/burst-sqlite.db*
      start burst-sqlite "sqlite://$OUT/burst-sqlite.db" "" 100 1500 800
      drive burst-sqlite burst --drivers 1000 --trips 1000
      stop ;;
    hot-path)  # issue #11: the accept vs pgbench's minimal fence transaction, same run
      lim=$(fresh_pg fence)
      mkdir -p "$OUT/fence" && printf '[database]\nurl = "%s"\n[auth]\nhs256_secret = "benchmark-secret-0123456789abcdef"\n' "$lim" > "$OUT/fence/config.toml"
      "$BIN" migrate --config "$OUT/fence/config.toml"
      psql "$lim" -q -f benches/e2e/pgbench_setup.sql
      fence() {  # CLIENTS LABEL
        pgbench -n -c "$1" -j "$(( $1 < 2 ? 1 : 2 ))" -T 15 -f benches/e2e/pgbench_fence.sql "$lim" \
          | tee "$OUT/pgbench-fence-$1-$2.txt" | grep -E 'latency average|tps'
        psql "$lim" -qc "UPDATE trip_requests SET driver_id = NULL, current_status = 'pending'; TRUNCATE jobs"
      }
      fence 8 before; fence 1 before
      start hot-path "$(fresh_pg hotpath)" "$REDIS" 100 1500 800
      drive hot-path burst --drivers 300 --trips 300 --concurrency 1      # idle: one at a time
      drive hot-path burst --drivers 6000 --trips 6000 --concurrency 64   # saturation
      drive hot-path burst --drivers 1000 --trips 1000                    # burst, all at once
      stop
      fence 8 after; fence 1 after
      pgbench -n -c 8 -j 2 -T 15 -f benches/e2e/pgbench_accept_function.sql "$lim" \
        | tee "$OUT/pgbench-accept-function.txt" | grep -E 'latency average|tps'
      ;;
    idle)  # the idle accept alone, longer: 1,000 sequential first accepts (alternate BIN to compare builds)
      start idle "$(fresh_pg idle)" "$REDIS" 100 1500 800
      drive idle burst --drivers 1000 --trips 1000 --concurrency 1
      stop ;;
    shards)  # issue #17: one database, then two databases as two shards — same drives, same run
      start shards-one "$(fresh_pg shards_one)" "$REDIS" 100 1500 800
      drive shards-one burst --drivers 6000 --trips 6000 --concurrency 64   # saturation
      drive shards-one burst --drivers 1000 --trips 1000                    # burst
      stop
      a=$(fresh_pg shard_a); b=$(fresh_pg shard_b)
      start shards-two "$(fresh_pg shards_global)" "$REDIS" 100 1500 800 "$a" "$b"
      drive shards-two burst --drivers 6000 --trips 6000 --concurrency 64
      drive shards-two burst --drivers 1000 --trips 1000
      stop
      for url in "$a" "$b"; do  # each shard's own accepts, jobs and invariants
        psql "$url" -Atc "SELECT '$url', (SELECT COUNT(*) FROM trip_requests WHERE driver_id IS NOT NULL) AS accepted,
          (SELECT COUNT(*) FROM jobs) AS jobs,
          (SELECT COUNT(*) FROM (SELECT driver_id FROM trip_requests WHERE driver_id IS NOT NULL
             AND current_status IN ('accepted', 'ongoing') GROUP BY driver_id HAVING COUNT(*) > 1) x) AS drivers_with_two_trips" \
          | tee -a "$OUT/shards-split.txt"
      done ;;
    cpu-split)  # where a saturated accept's CPU goes: each process's CPU over the accepts
      start cpu-split "$(fresh_pg cpu_split)" "$REDIS" 100 1500 800
      python3 benches/e2e/cpu_sample.py sample "$serve_pid" "$OUT/cpu-split/samples.txt" &
      drive cpu-split burst --drivers 6000 --trips 6000 --concurrency 64
      stop; sleep 0.5
      python3 benches/e2e/cpu_sample.py window "$OUT/cpu-split/samples.txt" | tee "$OUT/cpu-split.txt" ;;
    jobs)  # issue #12: do the side effects keep up? Providers answering at once (simulated, 0 ms)
      start jobs-sat "$(fresh_pg jobs_sat)" "$REDIS" 100 0 0
      drive jobs-sat burst --drivers 6000 --trips 6000 --concurrency 64   # saturation: otp_after_load_ms
      stop
      start jobs-burst "$(fresh_pg jobs_burst)" "$REDIS" 100 0 0
      drive jobs-burst burst --drivers 1000 --trips 1000                  # burst: otp_p95_ms
      stop
      start jobs-steady "$(fresh_pg jobs_steady)" "$REDIS" 50 0 0
      drive jobs-steady steady --rate 50 --duration 30                    # steady at 50 %: otp_p95_ms
      stop ;;
    saturation)  # accepts/s at saturation vs the storage limit (pgbench, redis-benchmark)
      url=$(fresh_pg saturation)
      start saturation "$url" "$REDIS" 100 1500 800
      drive saturation burst --drivers 5000 --trips 5000 --concurrency 64
      stop
      lim=$(fresh_pg limit)
      TRIPGATE_DATABASE_URL=$lim "$BIN" migrate --config "$OUT/saturation/config.toml"
      psql "$lim" -q -f benches/e2e/pgbench_setup.sql
      pgbench -n -c 64 -j 2 -T 20 -f benches/e2e/pgbench_accept.sql "$lim" | tee "$OUT/pgbench.txt"
      redis-benchmark -q -c 64 -n 200000 -r 100000 SET 'bench:trip-lock:{__rand_int__}' driver NX EX 300 | tee "$OUT/redis-benchmark.txt"
      ;;
  esac
done
