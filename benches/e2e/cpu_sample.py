"""Where a saturated accept's CPU goes (BENCHMARKS.md §0), for `SCENARIOS=cpu-split`.

  python3 cpu_sample.py sample SERVE_PID FILE   every 250 ms until the gateway exits: the CPU
                                                ticks of the gateway, the load generator (`BIN
                                                drive --config …`, whatever BIN is called), every
                                                Postgres backend and Redis, and the gateway's
                                                accept counter
  python3 cpu_sample.py window FILE             each one's CPU per accept over the seconds the
                                                accept counter rose
"""
import os
import subprocess
import sys
import time
import urllib.request


def ticks(pids):
    total = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def accepts():
    try:
        text = urllib.request.urlopen("http://127.0.0.1:19090/metrics", timeout=1).read().decode()
    except OSError:
        return -1
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tripgate_http_requests_total") and "accept" in line)


def sample(serve, path):
    with open(path, "w") as out:
        while os.path.exists(f"/proc/{serve}"):
            cpu = open("/proc/stat").readline().split()
            out.write(f"{time.time():.2f} {ticks([serve])} {ticks(pids(' drive --config '))} "
                      f"{ticks(pids('postgres:'))} {ticks(pids('redis-server'))} {accepts()} "
                      f"{cpu[4]} {sum(int(x) for x in cpu[1:8])}\n")
            out.flush()
            time.sleep(0.25)


def window(path):
    rows = [list(map(float, line.split())) for line in open(path)]
    first, last = rows[0][5], max(r[5] for r in rows)
    start = next(i for i, r in enumerate(rows) if r[5] > first + 10)
    end = next(i for i in range(start, len(rows)) if rows[i][5] >= last - 5)
    a, b = rows[start - 1], rows[end]
    seconds, n = b[0] - a[0], b[5] - a[5]
    hz = os.sysconf("SC_CLK_TCK")
    print(f"window {seconds:.2f} s, {n:.0f} accepts, {n / seconds:.0f}/s")
    for k, name in [(1, "gateway"), (2, "drive"), (3, "postgres"), (4, "redis")]:
        cpu = (b[k] - a[k]) / hz
        print(f"{name:9s} {cpu:5.2f} s CPU = {cpu / seconds * 100:3.0f} % of a core, "
              f"{cpu / n * 1e6:4.0f} us per accept")
    print(f"machine idle {(b[6] - a[6]) / (b[7] - a[7]) * 100:.0f} %")


if __name__ == "__main__":
    if sys.argv[1] == "sample":
        sample(int(sys.argv[2]), sys.argv[3])
    else:
        window(sys.argv[2])
