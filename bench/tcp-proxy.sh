#!/usr/bin/env bash
# The TCP proxy: throughput (iperf3) and connection rate (wrk with Connection: close
# to an nginx backend, so every request is a new TCP connection through the proxy),
# through pillion (splice), haproxy in tcp mode (splice-auto, nbthread 1), socat, and
# directly; interleaved over ROUNDS rounds; medians and ratios.
#
#   bench/tcp-proxy.sh
#   ROUNDS=5 DURATION=8 bench/tcp-proxy.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}

install_tools iperf3:iperf3 socat:socat haproxy:haproxy nginx:nginx-light wrk:wrk
build_pillion

IP=$(free_port); B=$(free_port)
iperf3 -s -p "$IP" >"$WORK/iperf3.log" 2>&1 & PIDS+=($!)
start_backend "$B"
wait_port "$IP"

# Each proxy gets two listeners: one to iperf3, one to nginx.
P1=$(free_port); P2=$(free_port); H1=$(free_port); H2=$(free_port); S1=$(free_port); S2=$(free_port)
cat > "$WORK/pillion.toml" <<CONF
[[tcp]]
listen = "127.0.0.1:$P1"
[[tcp.tiers]]
targets = ["127.0.0.1:$IP"]
[[tcp]]
listen = "127.0.0.1:$P2"
[[tcp.tiers]]
targets = ["127.0.0.1:$B"]
CONF
RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$(free_port)" --worker-threads 1 --config "$WORK/pillion.toml" & PIDS+=($!)
{ haproxy_config tcp; cat <<CONF
listen iperf
  bind 127.0.0.1:$H1
  server s1 127.0.0.1:$IP
listen web
  bind 127.0.0.1:$H2
  server s1 127.0.0.1:$B
CONF
} > "$WORK/haproxy-tcp.cfg"
haproxy -f "$WORK/haproxy-tcp.cfg" -db & PIDS+=($!)
socat "TCP-LISTEN:$S1,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$IP" & PIDS+=($!)
socat "TCP-LISTEN:$S2,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$B" & PIDS+=($!)
for p in $P1 $P2 $H1 $H2 $S1 $S2; do wait_port "$p"; done

declare -A THRU=([direct]=$IP [pillion]=$P1 [haproxy]=$H1 [socat]=$S1)
declare -A CONN=([direct]=$B [pillion]=$P2 [haproxy]=$H2 [socat]=$S2)
ORDER=(direct pillion haproxy socat)
RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    say "round $r/$ROUNDS: $t"
    gbps=$(iperf3 -c 127.0.0.1 -p "${THRU[$t]}" -t "$DURATION" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
    cps=$(wrk -t1 -c16 -d"${DURATION}s" -H "Connection: close" "http://127.0.0.1:${CONN[$t]}/" | awk '/^Requests\/sec/ {print $2}')
    echo "$t $gbps $cps" >> "$RAW"
  done
done

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$BENCH_DIR/results/tcp-proxy.json" "$DURATION" "$ROUNDS" <<'PY'
import json, statistics, sys
raw, out, dur, rounds = sys.argv[1:]
runs = {}
for line in open(raw):
    t, g, c = line.split()
    runs.setdefault(t, []).append((float(g), float(c)))
rows = {t: {"gbit_per_sec": statistics.median(x[0] for x in v), "connections_per_sec": statistics.median(x[1] for x in v)} for t, v in runs.items()}
h, d = rows["haproxy"], rows["direct"]
print(f"TCP proxy: iperf3 -t {dur}, wrk -c16 Connection: close, {rounds} rounds, medians")
print(f"{'target':<9} {'Gbit/s':>7} {'conn/s':>8} {'Gbit/s vs haproxy':>18} {'conn/s vs haproxy':>18} {'Gbit/s vs direct':>17}")
for t, r in rows.items():
    r["gbit_vs_haproxy"] = r["gbit_per_sec"] / h["gbit_per_sec"]
    r["conn_vs_haproxy"] = r["connections_per_sec"] / h["connections_per_sec"]
    r["gbit_vs_direct"] = r["gbit_per_sec"] / d["gbit_per_sec"]
    print(f"{t:<9} {r['gbit_per_sec']:>7.2f} {r['connections_per_sec']:>8.0f} {r['gbit_vs_haproxy']:>18.2f} {r['conn_vs_haproxy']:>18.2f} {r['gbit_vs_direct']:>17.2f}")
json.dump({"results": rows}, open(out, "w"), indent=2)
print(f"written to {out}")
PY
