#!/usr/bin/env bash
# The registry's own cost at scale: SERVICES one-node services registered one by one
# through a sidecar's HTTP API (POST /registry, one keep-alive connection), on the
# default cluster registry (REGISTRY=memory for the in-process one). Prints the total time, the latency of the last 1,000
# registrations, the sidecar's resident memory per service, and the latency of
# GET /registry?service=NAME at that size.
#
#   bench/registry-scale.sh
#   SERVICES=12000 bench/registry-scale.sh
#   REGISTRY=memory bench/registry-scale.sh
#   PILLION=/path/to/pillion bench/registry-scale.sh   # a binary built before
source "$(dirname "$0")/lib.sh"
SERVICES=${SERVICES:-50000}

[ -n "${PILLION:-}" ] || build_pillion
PORT=$(free_port)
REGISTRY=${REGISTRY:-cluster}
RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$PORT" --registry "$REGISTRY" \
  --cluster-bind "127.0.0.1:$(free_port)" & PIDS+=($!)
PID=$!
wait_port "$PORT"

mkdir -p "$BENCH_DIR/results"
python3 - "$PORT" "$PID" "$SERVICES" "$BENCH_DIR/results/registry-scale.json" <<'PY'
import gc, http.client, json, statistics, sys, time

gc.disable()  # the client's own pauses would count as the sidecar's latency

port, pid, services, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]

def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

def call(method, path, body=None):
    start = time.perf_counter()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    res = conn.getresponse()
    data = res.read()
    took = time.perf_counter() - start
    if res.status != 200:
        sys.exit(f"{method} {path}: {res.status} {data[:200]!r}")
    return took

# Warm the connection and the allocator with one registration, then measure.
call("POST", "/registry", json.dumps({"name": "warm", "nodes": [{"id": "warm-1", "address": "127.0.0.1:1"}]}))
time.sleep(0.5)
rss_before = rss_kib()
latencies = []
start = time.perf_counter()
for i in range(services):
    body = json.dumps({"name": f"svc-{i:06d}", "nodes": [{"id": f"svc-{i:06d}-1", "address": f"127.0.0.1:{1024 + i % 60000}"}]})
    latencies.append(call("POST", "/registry", body))
total = time.perf_counter() - start
time.sleep(1.0)  # let the sidecar's followers (the data path's endpoint set) settle
rss_after = rss_kib()

gets = [call("GET", f"/registry?service=svc-{(i * 7919) % services:06d}") for i in range(2000)]

def ms(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

last = latencies[-1000:]
result = {
    "services": services,
    "total_s": round(total, 2),
    "last_1000_mean_ms": round(statistics.mean(last) * 1000, 3),
    "last_1000_p99_ms": round(ms(last, 0.99), 3),
    "first_1000_mean_ms": round(statistics.mean(latencies[:1000]) * 1000, 3),
    "rss_before_mib": round(rss_before / 1024, 1),
    "rss_after_mib": round(rss_after / 1024, 1),
    "rss_per_service_bytes": round((rss_after - rss_before) * 1024 / services),
    "get_mean_ms": round(statistics.mean(gets) * 1000, 3),
    "get_median_ms": round(ms(gets, 0.5), 3),
    "get_p99_ms": round(ms(gets, 0.99), 3),
}
print(f"registered {services} one-node services in {result['total_s']} s")
print(f"  first 1,000: {result['first_1000_mean_ms']} ms each (mean)")
print(f"  last 1,000:  {result['last_1000_mean_ms']} ms each (mean), p99 {result['last_1000_p99_ms']} ms")
print(f"  RSS: {result['rss_before_mib']} MiB before, {result['rss_after_mib']} MiB after: "
      f"{result['rss_per_service_bytes']} bytes per service")
print(f"  GET /registry?service=NAME: {result['get_mean_ms']} ms mean, median {result['get_median_ms']} ms, p99 {result['get_p99_ms']} ms")
json.dump(result, open(out, "w"), indent=2)
print(f"written to {out}")
PY
