#!/usr/bin/env bash
# HTTP/1.1 keep-alive through a reverse proxy: pillion (--handler proxy) vs haproxy
# vs nginx vs a direct connection to the backend, one worker thread each, the same
# wrk load (closed loop, -t1 -c32), interleaved over ROUNDS rounds (A B C D, A B C D..).
#
#   bench/http-proxy.sh            # 5 rounds of 4 s
#   ROUNDS=5 DURATION=8 bench/http-proxy.sh
#
# Prints a table of medians and ratios and writes bench/results/http-proxy.json.
source "$(dirname "$0")/lib.sh"
# Five rounds: on a shared 2-core machine one round in three can be off by 10%.
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4}
CONNS=${CONNS:-32}

install_tools wrk:wrk nginx:nginx-light haproxy:haproxy curl:curl
build_pillion

B=$(free_port); N=$(free_port); H=$(free_port); P=$(free_port)
start_backend "$B"
start_nginx_proxy "$N" "$B"
start_haproxy "$H" "$B"
start_pillion "$P" "$B"

declare -A URL=(
  [direct]="http://127.0.0.1:$B/bench/x"
  [pillion]="http://127.0.0.1:$P/bench/x"
  [haproxy]="http://127.0.0.1:$H/bench/x"
  [nginx]="http://127.0.0.1:$N/bench/x"
)
ORDER=(direct pillion haproxy nginx)

# warm up every target (connections, caches)
for t in "${ORDER[@]}"; do wrk -t1 -c"$CONNS" -d1s "${URL[$t]}" >/dev/null; done

RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    say "round $r/$ROUNDS: $t"
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${URL[$t]}")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    [ -n "$errs" ] && say "  $t: $errs"
    say "  $rps req/s, p50 $p50, p99 $p99"
    echo "$t $rps $p50 $p99" >> "$RAW"
  done
done

mkdir -p "$BENCH_DIR/results"
python3 "$BENCH_DIR/report.py" "$RAW" "$BENCH_DIR/results/http-proxy.json" \
  "HTTP/1.1 keep-alive, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, medians"
