#!/usr/bin/env bash
# Interleaved A/B of two pillion binaries on the HTTP/1.1 keep-alive proxy test
# (wrk -t1 -c32, one worker thread each), with haproxy in every round as the yardstick:
# req/s, p99, and the proxy's CPU per request (from /proc). Every attempt recorded in
# bench/README.md was measured with this script.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY               # 6 rounds of 4 s
#   ROUNDS=8 DURATION=5 CONNS=32 bench/ab.sh A B
#   PROTO=h2c bench/ab.sh A B     # h2c callers and an h2c backend (h2load -t1 -c8 -m10;
#                                 # h2load reports no p99, shown as 0)
#
# Build the binaries first (cargo build --release, then copy target/release/pillion
# aside for each variant).
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-4}
CONNS=${CONNS:-32}
PROTO=${PROTO:-http1}
[ $# -eq 2 ] || { say "usage: bench/ab.sh OLD_BINARY NEW_BINARY"; exit 2; }
A=$(realpath "$1"); Bin=$(realpath "$2")

install_tools wrk:wrk h2load:nghttp2-client nginx:nginx-light haproxy:haproxy curl:curl

B=$(free_port); H=$(free_port); PA=$(free_port); PB=$(free_port)
start_backend "$B"
start_haproxy "$H" "$B"
PILLION=$A start_pillion "$PA" "$B"
PILLION=$Bin start_pillion "$PB" "$B"
declare -A URL=([a]="http://127.0.0.1:$PA/bench/x" [b]="http://127.0.0.1:$PB/bench/x"
  [haproxy]="http://127.0.0.1:$H/bench/x")
declare -A PID=([a]=$(pgrep -f -- "--address 127.0.0.1:$PA") [b]=$(pgrep -f -- "--address 127.0.0.1:$PB")
  [haproxy]=$(pgrep -f -- "$WORK/haproxy/haproxy.cfg"))
if [ "$PROTO" = h2c ]; then
  B2=$(free_port); H2=$(free_port)
  start_h2c_backend "$B2"
  start_haproxy_h2c "$H2" "$B2"
  register_h2c "$PA" "$B2"; register_h2c "$PB" "$B2"
  URL=([a]="http://127.0.0.1:$PA/bench2/x" [b]="http://127.0.0.1:$PB/bench2/x"
    [haproxy]="http://127.0.0.1:$H2/bench2/x")
  PID[haproxy]=$(pgrep -f -- "$WORK/haproxy-h2.cfg")
fi

# load URL SECONDS: "req/s p99 requests" of one run, or nothing if any request failed
load() {
  local out
  if [ "$PROTO" = h2c ]; then
    out=$(h2load -t1 -c8 -m10 -D "$2" "$1" 2>/dev/null)
    grep -q ' 0 failed, 0 errored' <<<"$out" && grep -q ' 0 3xx, 0 4xx, 0 5xx' <<<"$out" || return 0
    awk '/^finished in/ {r=$4} /^requests:/ {n=$2} END {print r, "0us", n}' <<<"$out"
  else
    out=$(wrk -t1 -c"$CONNS" -d"${2}s" --latency "$1")
    grep -q "Non-2xx\|Socket errors" <<<"$out" && return 0
    awk '/^Requests\/sec/ {r=$2} $1=="99%" {p=$2} /requests in/ {n=$1} END {print r, p, n}' <<<"$out"
  fi
}

for t in a b haproxy; do load "${URL[$t]}" 1 >/dev/null; done

RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in a b haproxy; do
    c0=$(ticks "${PID[$t]}")
    out=$(load "${URL[$t]}" "$DURATION")
    c1=$(ticks "${PID[$t]}")
    read -r rps p99 total <<<"$out" || true
    if [ -z "${rps:-}" ] || [ -z "${total:-}" ]; then
      say "$t: a failed run (errors or non-2xx answers), left out"; continue
    fi
    echo "$t $rps $p99 $(( (c1 - c0) )) $total" >> "$RAW"
    say "round $r $t: $rps req/s p99 $p99"
  done
done

python3 - "$RAW" "$A" "$Bin" <<'PY'
import statistics, sys
rows = {}
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
for line in open(sys.argv[1]):
    t, rps, p99, ticks, total = line.split()
    rows.setdefault(t, []).append((float(rps), ms(p99), int(ticks) * 1e4 / int(total)))
med = {t: [statistics.median(c) for c in zip(*v)] for t, v in rows.items()}
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}")
print(f"{'':8} {'req/s':>9} {'p99 ms':>7} {'us/req':>7} {'req/s vs haproxy':>17}")
for t in ("a", "b", "haproxy"):
    r, p, u = med[t]
    print(f"{t:8} {r:9.0f} {p:7.2f} {u:7.2f} {r / med['haproxy'][0]:17.2f}")
a, b = med["a"], med["b"]
print(f"B vs A: req/s {100 * (b[0] / a[0] - 1):+.1f}%, us/request {100 * (b[2] / a[2] - 1):+.1f}%")
PY
