#!/usr/bin/env bash
# Broker throughput and publish-to-receive latency: the same closed-loop load
# (CONCURRENCY publishers, each waiting for its publish to be accepted; one
# subscriber) through pillion's embedded broker, through pillion on NATS, and on
# nats-server directly; then a stream of messages over one connection (WINDOW not yet
# acknowledged): a publishing websocket into pillion (embedded and on NATS) against
# one NATS connection to nats-server. Interleaved over ROUNDS rounds; medians and
# ratios to the direct run of the same kind.
#
#   bench/broker.sh
#   ROUNDS=5 SECONDS_PER_RUN=8 CONCURRENCY=16 WINDOW=512 bench/broker.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-4}
CONCURRENCY=${CONCURRENCY:-8}
WINDOW=${WINDOW:-256}

install_tools nats-server:nats-server curl:curl
build_pillion
say "building the load generator"
(cd "$ROOT" && cargo build --release -q -p pillion-broker --example broker_load)
LOAD="$ROOT/target/release/examples/broker_load"

NP=$(free_port); E=$(free_port); N=$(free_port)
nats-server -a 127.0.0.1 -p "$NP" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
wait_port "$NP"
RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$E" --worker-threads 1 & PIDS+=($!)
RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$N" --worker-threads 1 --broker "nats://127.0.0.1:$NP" & PIDS+=($!)
wait_port "$E"; wait_port "$N"

RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in direct embedded nats stream-direct stream-embedded stream-nats; do
    say "round $r/$ROUNDS: $t"
    case $t in
      direct) out=$("$LOAD" nats "nats://127.0.0.1:$NP" "$CONCURRENCY" "$SECONDS_PER_RUN") ;;
      embedded) out=$("$LOAD" sidecar "127.0.0.1:$E" "$CONCURRENCY" "$SECONDS_PER_RUN") ;;
      nats) out=$("$LOAD" sidecar "127.0.0.1:$N" "$CONCURRENCY" "$SECONDS_PER_RUN") ;;
      stream-direct) out=$("$LOAD" nats-stream "nats://127.0.0.1:$NP" "$WINDOW" "$SECONDS_PER_RUN") ;;
      stream-embedded) out=$("$LOAD" ws "127.0.0.1:$E" "$WINDOW" "$SECONDS_PER_RUN") ;;
      stream-nats) out=$("$LOAD" ws "127.0.0.1:$N" "$WINDOW" "$SECONDS_PER_RUN") ;;
    esac
    echo "$t $out" >> "$RAW"
  done
done

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$BENCH_DIR/results/broker.json" "$CONCURRENCY" "$SECONDS_PER_RUN" "$ROUNDS" "$WINDOW" <<'PY'
import json, statistics, sys
raw, out, conc, secs, rounds, window = sys.argv[1:]
runs = {}
for line in open(raw):
    target, js = line.split(" ", 1)
    runs.setdefault(target, []).append(json.loads(js))
rows = {}
for t, rs in runs.items():
    rows[t] = {k: statistics.median(r[k] for r in rs) for k in ("msgs_per_sec", "p50_ms", "p99_ms")}
    rows[t]["lost"] = sum(r["published"] - r["received"] for r in rs)
print(f"broker, {conc} closed-loop publishers or one stream of {window} in flight, {secs}s x {rounds} rounds, medians")
print(f"{'target':<16} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'msgs/s vs direct':>17} {'p99 vs direct':>14} {'lost':>5}")
for t, r in rows.items():
    d = rows["stream-direct" if t.startswith("stream-") else "direct"]
    r["msgs_vs_direct"] = r["msgs_per_sec"] / d["msgs_per_sec"]
    r["p99_vs_direct"] = r["p99_ms"] / d["p99_ms"] if d["p99_ms"] else 0
    print(f"{t:<16} {r['msgs_per_sec']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['msgs_vs_direct']:>17.2f} {r['p99_vs_direct']:>14.2f} {r['lost']:>5}")
json.dump({"concurrency": int(conc), "window": int(window), "results": rows}, open(out, "w"), indent=2)
print(f"written to {out}")
PY
