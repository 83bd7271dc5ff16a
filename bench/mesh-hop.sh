#!/usr/bin/env bash
# The mesh hop: a call by name at a fixed rate (open loop, 2,000 req/s, 32
# connections), p50 and p99 of
#  - direct:  the app (nginx) itself;
#  - plain:   caller sidecar -> receiving sidecar's registration -> app (one plain hop:
#             the caller sidecar dials the app's port);
#  - mesh:    caller sidecar -> mTLS -> receiving sidecar's --mesh-listen -> app (two
#             sidecars, the mesh's path).
# Every sidecar has one worker thread; rounds are interleaved. Target (issue 13): the
# mesh adds at most 0.3 ms p50 and 1 ms p99 over the plain hop.
#
#   bench/mesh-hop.sh                       # 3 rounds of 8 s
#   ROUNDS=5 DURATION=10 RATE=2000 bench/mesh-hop.sh
#   PILLION_BIN=/tmp/old/pillion bench/mesh-hop.sh   # another build, for an A/B
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
RATE=${RATE:-2000}

install_tools nginx:nginx-light curl:curl
if [ -n "${PILLION_BIN:-}" ]; then PILLION=$(realpath "$PILLION_BIN"); else build_pillion; fi
unset PILLION_BIN  # the bench's own setting, not the sidecars'
(cd "$ROOT" && cargo build --release -q -p pillion-invoke --example http_rate)
RATE_GEN="$ROOT/target/release/examples/http_rate"

B=$(free_port)
start_backend "$B"
"$PILLION" mesh init --out "$WORK/ca" >/dev/null 2>&1
MESH=(--mesh-ca-cert "$WORK/ca/ca.crt" --mesh-ca-key "$WORK/ca/ca.key")

udp_port() {
  python3 -c 'import socket; s=socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# sidecar API_PORT GOSSIP_PORT ARGS...
sidecar() {
  local port=$1 gossip=$2; shift 2
  PILLION_CLUSTER_BIND="127.0.0.1:$gossip" RUST_LOG=warn "$PILLION" run \
    --address "127.0.0.1:$port" --handler proxy --worker-threads 1 "$@" & PIDS+=($!)
  wait_port "$port"
}

# The plain pair: the receiver registers the app; the caller dials it directly.
R0=$(free_port); G0=$(udp_port); C0=$(free_port); GC0=$(udp_port)
sidecar "$R0" "$G0" --server-name plain --server-address "127.0.0.1:$B"
sidecar "$C0" "$GC0" --cluster-join "127.0.0.1:$G0"
# The mesh pair.
R1=$(free_port); G1=$(udp_port); M1=$(free_port); C1=$(free_port); GC1=$(udp_port)
sidecar "$R1" "$G1" --server-name meshed --server-address "127.0.0.1:$B" "${MESH[@]}" \
  --mesh-listen "127.0.0.1:$M1" --mesh-allow front
wait_port "$M1"
sidecar "$C1" "$GC1" --cluster-join "127.0.0.1:$G1" --server-name front "${MESH[@]}"

declare -A URL=([direct]="http://127.0.0.1:$B/x" [plain]="http://127.0.0.1:$C0/plain/x" [mesh]="http://127.0.0.1:$C1/meshed/x")
for t in plain mesh; do
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null "${URL[$t]}" && break
    sleep 0.1
  done
  curl -sf -o /dev/null "${URL[$t]}" || { say "$t: ${URL[$t]} does not answer"; exit 1; }
done
ORDER=(direct plain mesh)

RAW="$WORK/raw"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    say "round $round: $t"
    echo "$t|$("$RATE_GEN" "${URL[$t]}" "$RATE" 32 "$DURATION")" >> "$RAW"
  done
done

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$BENCH_DIR/results/mesh-hop.json" "$RATE" <<'PY'
import json, statistics, sys
raw, out, rate = sys.argv[1:]
runs = {}
for line in open(raw):
    t, fixed = line.strip().split("|", 1)
    f = json.loads(fixed)
    runs.setdefault(t, []).append((f["p50_ms"], f["p99_ms"], f["p999_ms"]))
rows = {t: {"p50_ms": statistics.median(x[0] for x in v),
            "p99_ms": statistics.median(x[1] for x in v),
            "p999_ms": statistics.median(x[2] for x in v)} for t, v in runs.items()}
added = {"p50_ms": rows["mesh"]["p50_ms"] - rows["plain"]["p50_ms"],
         "p99_ms": rows["mesh"]["p99_ms"] - rows["plain"]["p99_ms"]}
print(f"call by name at {rate} req/s (open loop, 32 connections), medians of {len(runs['mesh'])} rounds")
print(f"{'target':<8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>9}")
for t in ("direct", "plain", "mesh"):
    r = rows[t]
    print(f"{t:<8} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['p999_ms']:>9.3f}")
print(f"mesh over plain: +{added['p50_ms']:.3f} ms p50 (target <= 0.3), +{added['p99_ms']:.3f} ms p99 (target <= 1)")
json.dump({"rate": int(rate), "results": rows, "mesh_added_over_plain": added}, open(out, "w"), indent=2)
PY
