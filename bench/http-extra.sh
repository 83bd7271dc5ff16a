#!/usr/bin/env bash
# The rest of the HTTP scenarios, pillion (--handler proxy) vs haproxy vs nginx vs
# direct, one worker thread each, interleaved over ROUNDS rounds, medians:
#  - fixed rate at 50% of haproxy's closed-loop maximum (open loop, latency measured
#    from each request's scheduled time): p50, p99, p99.9 and added latency over direct;
#  - HTTP/2 (h2c, prior knowledge) through the proxy: requests/s (h2load -c8 -m10);
#  - a new connection per request (wrk, Connection: close): requests/s;
#  - memory: RSS idle, and under 1,000 concurrent keep-alive connections.
#
#   bench/http-extra.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}
ulimit -n 65536 2>/dev/null || true

install_tools wrk:wrk h2load:nghttp2-client nginx:nginx-light haproxy:haproxy curl:curl
build_pillion
say "building the open-loop load generator"
(cd "$ROOT" && cargo build --release -q -p pillion-invoke --example http_rate)
RATE_GEN="$ROOT/target/release/examples/http_rate"

B=$(free_port); B2=$(free_port)
start_backend "$B"
# An h2c backend (prior knowledge) for the HTTP/2 scenario.
start_h2c_backend "$B2"

N=$(free_port); H=$(free_port); P=$(free_port)
start_nginx_proxy "$N" "$B"
start_haproxy "$H" "$B"
start_pillion "$P" "$B"
register_h2c "$P" "$B2"
# h2c front ends for haproxy (to the h2c backend) and nginx (to the HTTP/1.1 backend).
H2H=$(free_port); H2N=$(free_port)
start_haproxy_h2c "$H2H" "$B2"
start_nginx "$WORK/nginx-h2" "  upstream backend { server 127.0.0.1:$B; keepalive 64; }
  server { listen 127.0.0.1:$H2N http2; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
wait_port "$H2H"; wait_port "$H2N"

PID_PILLION=$(pgrep -f -- "--address 127.0.0.1:$P" || true)
PID_HAPROXY=$(pgrep -f -- "$WORK/haproxy/haproxy.cfg" || true)
PID_NGINX=$(nginx_worker "$WORK/nginx-proxy")
rss() { awk '/VmRSS/ {print $2/1024}' "/proc/$1/status"; }
# The private part (heap, stacks): RSS less the binary's and libraries' pages, which
# every process running the same binary on a host shares.
private() { awk '/RssAnon/ {print $2/1024}' "/proc/$1/status"; }

declare -A URL=([direct]="http://127.0.0.1:$B/bench/x" [pillion]="http://127.0.0.1:$P/bench/x" [haproxy]="http://127.0.0.1:$H/bench/x" [nginx]="http://127.0.0.1:$N/bench/x")
declare -A H2URL=([direct]="http://127.0.0.1:$B2/bench2/x" [pillion]="http://127.0.0.1:$P/bench2/x" [haproxy]="http://127.0.0.1:$H2H/bench2/x" [nginx]="http://127.0.0.1:$H2N/bench2/x")
ORDER=(direct pillion haproxy nginx)

say "measuring haproxy's closed-loop maximum for the fixed rate"
MAX=$(wrk -t1 -c32 -d3s "${URL[haproxy]}" | awk '/^Requests\/sec/ {print int($2)}')
RATE=$((MAX / 2))
say "fixed rate: $RATE req/s"

RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    say "round $r/$ROUNDS: $t"
    fixed=$("$RATE_GEN" "${URL[$t]}" "$RATE" 32 "$DURATION")
    say "  fixed rate: $fixed"
    h2out=$(h2load -t1 -c8 -m10 -D "$DURATION" "${H2URL[$t]}" 2>/dev/null)
    # Only answers that are 2xx count: a proxy that answers 502 fast is not fast.
    if ! grep -q ' 0 failed, 0 errored' <<<"$h2out" || ! grep -q ' 0 3xx, 0 4xx, 0 5xx' <<<"$h2out"; then
      say "$t: h2load saw failed requests or non-2xx answers:"; grep -E '^(requests|status codes):' <<<"$h2out" >&2; exit 1
    fi
    h2=$(awk '/^finished in/ {print $4}' <<<"$h2out")
    fresh=$(wrk -t1 -c16 -d"${DURATION}s" -H "Connection: close" "${URL[$t]}" | awk '/^Requests\/sec/ {print $2}')
    echo "$t|$fixed|${h2:-0}|${fresh:-0}" >> "$RAW"
  done
done

MEM="$WORK/mem.txt"; : > "$MEM"
for t in pillion haproxy nginx; do
  case $t in pillion) pid=$PID_PILLION ;; haproxy) pid=$PID_HAPROXY ;; nginx) pid=$PID_NGINX ;; esac
  [ -n "$pid" ] || continue
  idle=$(rss "$pid"); idle_private=$(private "$pid")
  say "memory under 1000 connections: $t"
  wrk -t1 -c1000 -d4s "${URL[$t]}" >/dev/null 2>&1 &
  load=$!
  sleep 3
  busy=$(rss "$pid"); busy_private=$(private "$pid")
  wait "$load" || true
  echo "$t $idle $busy $idle_private $busy_private" >> "$MEM"
done

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$MEM" "$BENCH_DIR/results/http-extra.json" "$RATE" <<'PY'
import json, statistics, sys
raw, mem, out, rate = sys.argv[1:]
runs = {}
for line in open(raw):
    t, fixed, h2, fresh = line.strip().split("|")
    f = json.loads(fixed)
    runs.setdefault(t, []).append((f["p50_ms"], f["p99_ms"], f["p999_ms"], float(h2), float(fresh)))
rows = {}
for t, v in runs.items():
    m = lambda i: statistics.median(x[i] for x in v)
    rows[t] = {"fixed_p50_ms": m(0), "fixed_p99_ms": m(1), "fixed_p999_ms": m(2), "h2c_rps": m(3), "new_conn_rps": m(4)}
for line in open(mem):
    t, idle, busy, idle_private, busy_private = line.split()
    rows.setdefault(t, {})
    rows[t]["rss_idle_mb"] = float(idle)
    rows[t]["rss_1000_conns_mb"] = float(busy)
    rows[t]["private_idle_mb"] = float(idle_private)
    rows[t]["private_1000_conns_mb"] = float(busy_private)
d, h = rows["direct"], rows["haproxy"]
print(f"HTTP extra scenarios ({rate} req/s fixed rate = 50% of haproxy's max), medians")
print(f"{'target':<8} {'p50':>6} {'p99':>6} {'p99.9':>6} {'+p99 vs direct':>14} {'h2c req/s':>10} {'new-conn req/s':>14} {'RSS idle':>9} {'RSS 1k conns':>12} {'private idle/1k':>16}")
for t, r in rows.items():
    r["added_p99_ms"] = r["fixed_p99_ms"] - d["fixed_p99_ms"]
    r["h2c_vs_haproxy"] = r["h2c_rps"] / h["h2c_rps"] if h["h2c_rps"] else 0
    r["new_conn_vs_haproxy"] = r["new_conn_rps"] / h["new_conn_rps"] if h["new_conn_rps"] else 0
    print(f"{t:<8} {r['fixed_p50_ms']:>6.2f} {r['fixed_p99_ms']:>6.2f} {r['fixed_p999_ms']:>6.2f} {r['added_p99_ms']:>14.2f} {r['h2c_rps']:>10.0f} {r['new_conn_rps']:>14.0f} {r.get('rss_idle_mb', 0):>9.1f} {r.get('rss_1000_conns_mb', 0):>12.1f} {r.get('private_idle_mb', 0):>7.1f}/{r.get('private_1000_conns_mb', 0):<8.1f}")
json.dump({"fixed_rate": int(rate), "results": rows}, open(out, "w"), indent=2)
print(f"written to {out}")
PY
