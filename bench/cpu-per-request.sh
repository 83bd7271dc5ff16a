#!/usr/bin/env bash
# CPU time per request of the proxy, the backend and wrk (from /proc), and idle CPU,
# during HTTP/1.1 keep-alive load (wrk -t1 -c32): pillion vs haproxy, interleaved.
# With one worker thread the proxy is the bottleneck, so its CPU per request is what
# sets its req/s; the others show what it costs the rest of the machine.
#
#   bench/cpu-per-request.sh            # 3 rounds of 5 s
#   ROUNDS=5 bench/cpu-per-request.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}

install_tools wrk:wrk nginx:nginx-light haproxy:haproxy curl:curl
build_pillion

B=$(free_port); H=$(free_port); P=$(free_port)
start_backend "$B"
start_haproxy "$H" "$B"
start_pillion "$P" "$B"
PID_PILLION=$(pgrep -f -- "--address 127.0.0.1:$P")
PID_HAPROXY=$(pgrep -f -- "$WORK/haproxy/haproxy.cfg")
PID_BACKEND=$(nginx_worker "$WORK/backend")

idle() { awk '/^cpu / {print $5}' /proc/stat; }
CORES=$(nproc)

measure() {
  local name=$1 pid=$2 url=$3
  local p0 b0 w0 i0 p1 b1 w1 i1 wrk_pid load
  wrk -t1 -c32 -d1s "$url" >/dev/null
  wrk -t1 -c32 -d"$((DURATION + 1))s" "$url" > "$WORK/wrk.out" & load=$!
  sleep 0.5
  wrk_pid=$(pgrep -n -x wrk)
  p0=$(ticks "$pid"); b0=$(ticks "$PID_BACKEND"); w0=$(ticks "$wrk_pid"); i0=$(idle)
  sleep "$DURATION"
  p1=$(ticks "$pid"); b1=$(ticks "$PID_BACKEND"); w1=$(ticks "$wrk_pid"); i1=$(idle)
  wait "$load"
  local rps; rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.out")
  python3 -c "
r, t = $rps, $DURATION
us = lambda d: d * 1e4 / (r * t)
print('%-8s %8.0f %10.2f %10.2f %10.2f %8.0f%%' % ('$name', r, us($p1-$p0), us($b1-$b0), us($w1-$w0), ($i1-$i0) / ($CORES * t)))"
}

printf '%-8s %8s %10s %10s %10s %9s\n' target req/s "proxy us" "backend us" "wrk us" "idle"
for r in $(seq 1 "$ROUNDS"); do
  measure pillion "$PID_PILLION" "http://127.0.0.1:$P/bench/x"
  measure haproxy "$PID_HAPROXY" "http://127.0.0.1:$H/bench/x"
done
