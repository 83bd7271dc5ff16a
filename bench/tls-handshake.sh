#!/usr/bin/env bash
# TLS handshakes per second on pillion's --listen (HTTPS, the inbound proxy) and on
# haproxy (bind ... ssl), the same ECDSA P-256 certificate, the same nginx app behind
# both, one worker thread each. wrk sends `Connection: close`, so every request is a
# new TCP connection and a full TLS 1.3 handshake (no resumption). Rounds are
# interleaved. Target (issue 13): pillion >= 0.8 x haproxy.
#
#   bench/tls-handshake.sh                  # 3 rounds of 5 s
#   ROUNDS=5 DURATION=8 bench/tls-handshake.sh
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}

install_tools wrk:wrk nginx:nginx-light haproxy:haproxy openssl:openssl curl:curl
build_pillion

B=$(free_port)
start_backend "$B"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/combined.pem"

P=$(free_port); A=$(free_port); H=$(free_port)
RUST_LOG=warn PILLION_CLUSTER_BIND="127.0.0.1:$(free_port)" "$PILLION" run --address "127.0.0.1:$A" \
  --worker-threads 1 --listen "127.0.0.1:$P" --app "http://127.0.0.1:$B" \
  --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" & PIDS+=($!)
wait_port "$P"
mkdir -p "$WORK/haproxy"
{ haproxy_config http; cat <<CONF
frontend fe
  bind 127.0.0.1:$H ssl crt $WORK/combined.pem
  default_backend be
backend be
  server s1 127.0.0.1:$B
CONF
} > "$WORK/haproxy/haproxy.cfg"
haproxy -f "$WORK/haproxy/haproxy.cfg" -db & PIDS+=($!)
wait_port "$H"

declare -A URL=([pillion]="https://127.0.0.1:$P/x" [haproxy]="https://127.0.0.1:$H/x")
for t in pillion haproxy; do
  curl -sSfk -o /dev/null "${URL[$t]}" || { say "$t: ${URL[$t]} does not answer"; exit 1; }
done

RAW="$WORK/raw"
for round in $(seq 1 "$ROUNDS"); do
  for t in pillion haproxy; do
    say "round $round: $t"
    out=$(wrk -t1 -c16 -d"${DURATION}s" -H 'Connection: close' "${URL[$t]}")
    # Only answered requests count: an error page is not a handshake served.
    if grep -q "Non-2xx" <<<"$out"; then say "$t: answers that are not 2xx:"; say "$out"; exit 1; fi
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    echo "$t|${rps:-0}" >> "$RAW"
  done
done

mkdir -p "$BENCH_DIR/results"
python3 - "$RAW" "$BENCH_DIR/results/tls-handshake.json" <<'PY'
import json, statistics, sys
raw, out = sys.argv[1:]
runs = {}
for line in open(raw):
    t, rps = line.strip().split("|")
    runs.setdefault(t, []).append(float(rps))
rows = {t: statistics.median(v) for t, v in runs.items()}
ratio = rows["pillion"] / rows["haproxy"] if rows["haproxy"] else 0
print(f"TLS 1.3 handshakes/s (a new connection per request, wrk -t1 -c16), medians of {len(runs['pillion'])} rounds")
for t in ("pillion", "haproxy"):
    print(f"{t:<8} {rows[t]:>9.0f}   rounds: {', '.join(f'{x:.0f}' for x in runs[t])}")
print(f"pillion / haproxy: {ratio:.2f} (target >= 0.8)")
json.dump({"handshakes_per_s": rows, "rounds": runs, "ratio": ratio}, open(out, "w"), indent=2)
PY
