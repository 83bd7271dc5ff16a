#!/usr/bin/env bash
# The embedded broker across sidecars: CONCURRENCY publishers (HTTP POST, each
# waiting for its publish to be accepted) on sidecar A, a websocket subscriber on
# sidecar B; the two sidecars (one worker thread each, release build) find each other
# through a shared etcd. Prints, for each of ROUNDS rounds, messages/s accepted, how
# many were delivered and the CPU each sidecar spent per message, then the median; then
# the same load on nats-server directly as a reference. With PEERS=N (N > 1) a second
# scenario: one publisher on A, a subscriber on each of N sidecars.
#
#   bench/broker-fanout.sh
#   ROUNDS=5 SECONDS_PER_RUN=10 CONCURRENCY=8 PEERS=10 bench/broker-fanout.sh
source "$(dirname "$0")/lib.sh"
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
CONCURRENCY=${CONCURRENCY:-8}
PEERS=${PEERS:-1}
ROUNDS=${ROUNDS:-3}

install_tools nats-server:nats-server etcd:etcd
build_pillion
say "building the load generator"
(cd "$ROOT" && cargo build --release -q -p pillion-broker --example broker_load)
LOAD="$ROOT/target/release/examples/broker_load"

EC=$(free_port); EP=$(free_port)
etcd --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EC" \
  --advertise-client-urls "http://127.0.0.1:$EC" --listen-peer-urls "http://127.0.0.1:$EP" \
  >"$WORK/etcd.log" 2>&1 & PIDS+=($!)
wait_port "$EC"

# sidecar PORT: a pillion with one worker thread on the shared etcd
sidecar() {
  RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$1" --worker-threads 1 \
    --registry "etcd://127.0.0.1:$EC" --broker-subscriber-buffer 65536 & PIDS+=($!)
}
A=$(free_port)
sidecar "$A"; PID_A=${PIDS[-1]}
BS=()
for _ in $(seq 1 "$(( PEERS > 1 ? PEERS : 1 ))"); do B=$(free_port); sidecar "$B"; BS+=("127.0.0.1:$B"); done
PID_B=${PIDS[2]} # the first B (after etcd and A)
minus() { awk -v a="$1" -v b="$2" 'BEGIN { print a - b }'; }
# cpu PID: CPU seconds the process used so far
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14+$15)/hz}' "/proc/$1/stat"; }
wait_port "$A"; for b in "${BS[@]}"; do wait_port "${b#*:}"; done

report() { # NAME JSON CPU_A CPU_B
  python3 - "$@" <<'PY'
import json, sys
name, r, ca, cb = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"{name}: {r['accepted_per_sec']:.0f} msgs/s accepted, {r['received']} of {r['expected']} delivered"
      f" ({r['refused']} refused), p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms;"
      f" CPU per message: A {ca / max(r['published'], 1) * 1e6:.1f} us, B {cb / max(r['published'], 1) * 1e6:.1f} us")
PY
}

ACROSS=(); LOCAL=()
# rate JSON: messages/s accepted, 0 if any was not delivered
rate() { python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["accepted_per_sec"] if r["received"] == r["expected"] else 0)' "$1"; }
for r in $(seq 1 "$ROUNDS"); do
  say "round $r/$ROUNDS, A -> B: $CONCURRENCY publishers on A, one websocket subscriber on B, ${SECONDS_PER_RUN}s"
  a0=$(cpu "$PID_A"); b0=$(cpu "$PID_B")
  out=$("$LOAD" across "127.0.0.1:$A,${BS[0]}" "$CONCURRENCY" "$SECONDS_PER_RUN")
  a1=$(cpu "$PID_A"); b1=$(cpu "$PID_B")
  report "embedded, $CONCURRENCY publishers on A -> subscriber on B" "$out" \
    "$(minus "$a1" "$a0")" "$(minus "$b1" "$b0")"
  ACROSS+=("$(rate "$out")")
  # The same load with the subscriber on A itself: what the stream between sidecars adds.
  a0=$(cpu "$PID_A")
  out=$("$LOAD" sidecar "127.0.0.1:$A" "$CONCURRENCY" "$SECONDS_PER_RUN")
  a1=$(cpu "$PID_A")
  report "embedded, $CONCURRENCY publishers on A -> subscriber on A (reference)" "$out" "$(minus "$a1" "$a0")" 0
  LOCAL+=("$(rate "$out")")
done
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.0f}")' "$@"; }
echo "median over $ROUNDS rounds, msgs/s accepted and all delivered (a round that lost any counts 0):" \
  "A -> B $(median "${ACROSS[@]}"), A -> A $(median "${LOCAL[@]}")"

if [ "$PEERS" -gt 1 ]; then
  all=$(IFS=,; echo "${BS[*]}")
  say "fan-out: one publisher on A, a subscriber on each of $PEERS sidecars"
  a0=$(cpu "$PID_A"); b0=$(cpu "$PID_B")
  out=$("$LOAD" across "127.0.0.1:$A,$all" 1 "$SECONDS_PER_RUN")
  a1=$(cpu "$PID_A"); b1=$(cpu "$PID_B")
  report "embedded, 1 publisher on A -> $PEERS sidecars (B: the first of them)" "$out" \
    "$(minus "$a1" "$a0")" "$(minus "$b1" "$b0")"
fi

NP=$(free_port)
nats-server -a 127.0.0.1 -p "$NP" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
wait_port "$NP"
out=$("$LOAD" nats "nats://127.0.0.1:$NP" "$CONCURRENCY" "$SECONDS_PER_RUN")
mkdir -p "$BENCH_DIR/results"
python3 - "$out" "$(median "${ACROSS[@]}")" "$(median "${LOCAL[@]}")" "$CONCURRENCY" "$BENCH_DIR/results/broker-fanout.json" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
across, local, conc, out = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
print(f"reference, nats-server directly, same closed loop (publish + flush): {r['accepted_per_sec']:.0f} msgs/s, {r['received']} of {r['published']} delivered")
json.dump({"concurrency": conc, "across_msgs_per_sec": across, "local_msgs_per_sec": local,
           "nats_direct_msgs_per_sec": r["accepted_per_sec"]}, open(out, "w"), indent=2)
print(f"written to {out}")
PY
