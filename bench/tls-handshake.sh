#!/usr/bin/env bash
# TLS handshakes per second on HTTPS: pillion's inbound proxy (--listen with
# --tls-cert/--tls-key) vs haproxy (mode http, bind ... ssl crt), the same ECDSA P-256
# certificate, one worker thread each, the same nginx backend. Every request is a new
# connection with a FULL handshake: CLIENTS parallel `openssl s_time -new` (wrk with
# Connection: close resumes TLS sessions on reconnect: haproxy reports 100% reuse).
# Also the server's CPU per handshake (from /proc), which holds whether or not the
# clients ran out of CPU first. Needs lib-quiet.sh's helpers in lib.sh.
#
#   bench/tls-handshake.sh              # 3 rounds of 8 s
#   ROUNDS=5 DURATION=10 CLIENTS=4 bench/tls-handshake.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-4}

install_tools openssl:openssl nginx:nginx-light haproxy:haproxy curl:curl
build_pillion

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/combined.pem"

B=$(free_port); H=$(free_port); P=$(free_port); API=$(free_port)
start_backend "$B"

mkdir -p "$WORK/haproxy"
# the shared global/defaults, with a stats socket (to check that no session resumed)
{ haproxy_config http | sed "/^  maxconn/a\\  stats socket $WORK/haproxy/stats.sock mode 600 level admin"; cat <<CONF
frontend fe
  bind 127.0.0.1:$H ssl crt $WORK/combined.pem
  default_backend be
backend be
  server s1 127.0.0.1:$B
CONF
} > "$WORK/haproxy/haproxy.cfg"
haproxy -f "$WORK/haproxy/haproxy.cfg" -db & PIDS+=($!); PID_HAPROXY=$!
wait_port "$H"

# pillion: the in-process registry, so that no gossip meets other sidecars on this host
RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$API" --registry memory --worker-threads 1 \
  --listen "127.0.0.1:$P" --app "http://127.0.0.1:$B" \
  --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" >"$WORK/pillion.log" 2>&1 & PIDS+=($!); PID_PILLION=$!
wait_port "$P" || { cat "$WORK/pillion.log" >&2; exit 1; }

declare -A PORT=([pillion]=$P [haproxy]=$H)
declare -A PID=([pillion]=$PID_PILLION [haproxy]=$PID_HAPROXY)
ORDER=(pillion haproxy)

for t in "${ORDER[@]}"; do
  body=$(curl -sk "https://127.0.0.1:${PORT[$t]}/x")
  [ "$body" = "hello world" ] || { say "$t over HTTPS answered: $body"; exit 1; }
  say "$t: $(echo | openssl s_client -connect "127.0.0.1:${PORT[$t]}" 2>/dev/null |
    awk '/^New, / {n = $0} /Server Temp Key/ {k = $0} /Peer signature type/ {s = $0} END {print n "; " k "; " s}')"
done

# s_time sends "GET <path> HTTP/1.0" and nothing else; a Host header rides in the path
# (pillion passed a Host-less HTTP/1.0 request on as HTTP/1.1 without Host: nginx 400).
REQUEST=$'/x HTTP/1.0\r\nHost: localhost\r\nX-Pad:'
for t in "${ORDER[@]}"; do
  status=$( (printf 'GET %s HTTP/1.0\r\n\r\n' "$REQUEST"; sleep 0.5) |
    openssl s_client -quiet -connect "127.0.0.1:${PORT[$t]}" 2>/dev/null | head -1 | tr -d '\r')
  case $status in *" 200"*) ;; *) say "$t answered s_time's request with: $status"; exit 1 ;; esac
done

now() { date +%s.%N; }

# handshakes TARGET: CLIENTS s_time in parallel for DURATION s; prints
# "connections seconds server_cpu_s"
handshakes() {
  local port=${PORT[$1]} pid=${PID[$1]} c0 c1 t0 t1 jobs=()
  c0=$(ticks "$pid"); t0=$(now)
  for i in $(seq 1 "$CLIENTS"); do
    openssl s_time -connect "127.0.0.1:$port" -new -time "$DURATION" -www "$REQUEST" \
      >"$WORK/stime.$i" 2>&1 & jobs+=($!)
  done
  wait "${jobs[@]}"
  t1=$(now); c1=$(ticks "$pid")
  local n=0
  for i in $(seq 1 "$CLIENTS"); do
    n=$((n + $(awk '/connections in .* real seconds/ {print $1; exit}' "$WORK/stime.$i")))
  done
  echo "$n $(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}') $(awk -v a="$c0" -v b="$c1" 'BEGIN {print (b - a) / 100}')"
}

for t in "${ORDER[@]}"; do DURATION=1 handshakes "$t" >/dev/null; done   # warm up

RAW="$WORK/raw.txt"; : > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    wait_quiet
    a=$(cpu_stat); out=$(handshakes "$t"); b=$(cpu_stat)
    say "round $r/$ROUNDS: $t: connections seconds server-CPU-s = $out, machine busy $(busy_cores $a $b) cores"
    echo "$t $out $(busy_cores $a $b)" >> "$RAW"
  done
done

# haproxy's own count: none of its handshakes resumed a session
REUSE=$(python3 - "$WORK/haproxy/stats.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show info\n")
d = b""
while (c := s.recv(65536)): d += c
print(next((l.split(":")[1].strip() for l in d.decode().splitlines() if l.startswith("SslFrontendSessionReuse_pct")), "?"))
PY
)

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$BENCH_DIR/results/tls-handshake.json" "$CLIENTS" "$DURATION" "$ROUNDS" "$REUSE" <<'PY'
import json, statistics, sys
raw, out, clients, duration, rounds, reuse = sys.argv[1:]
runs = {}
for line in open(raw):
    t, n, secs, cpu, busy = line.split()
    n, secs, cpu = int(n), float(secs), float(cpu)
    runs.setdefault(t, []).append((n / secs, cpu / n * 1e6 if n else 0, cpu / secs, float(busy)))
rows = {}
for t, v in runs.items():
    m = lambda i: statistics.median(x[i] for x in v)
    rows[t] = {"handshakes_per_s": m(0), "server_cpu_us_per_handshake": m(1), "server_cpu_cores": m(2),
               "handshakes_per_s_rounds": [round(x[0]) for x in v],
               "server_cpu_us_rounds": [round(x[1], 1) for x in v],
               "machine_busy_cores_rounds": [x[3] for x in v]}
p, h = rows["pillion"], rows["haproxy"]
ratio = p["handshakes_per_s"] / h["handshakes_per_s"]
cpu_ratio = h["server_cpu_us_per_handshake"] / p["server_cpu_us_per_handshake"]
print(f"TLS handshakes (ECDSA P-256, new connection per request, {clients} x openssl s_time -new), "
      f"{rounds} rounds of {duration} s, medians; haproxy session reuse: {reuse}%")
print(f"{'target':<8} {'handshakes/s':>12} {'server CPU us/handshake':>23} {'server CPU (cores)':>18}")
for t, r in rows.items():
    print(f"{t:<8} {r['handshakes_per_s']:>12.0f} {r['server_cpu_us_per_handshake']:>23.1f} {r['server_cpu_cores']:>18.2f}")
print(f"pillion / haproxy: {ratio:.2f} x handshakes/s, {cpu_ratio:.2f} x by CPU per handshake (target >= 0.8: {'met' if ratio >= 0.8 else 'missed'})")
json.dump({"clients": int(clients), "seconds": float(duration), "rounds": int(rounds),
           "haproxy_session_reuse_pct": reuse, "ratio": ratio, "cpu_ratio": cpu_ratio,
           "results": rows}, open(out, "w"), indent=2)
print(f"written to {out}")
PY
