# Shared by the bench scripts: install tools, start and stop the processes under test.
# Everything listens on 127.0.0.1 only and is stopped on exit.

set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
WORK=$(mktemp -d /tmp/pillion-bench.XXXXXX)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '%s\n' "$*" >&2; }

# install_tools CMD:PACKAGE ...  -- apt-get installs the packages whose command is missing
install_tools() {
  local need=()
  for pair in "$@"; do
    local cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}" >&2
  fi
  export PATH="$PATH:/usr/sbin"
}

build_pillion() {
  say "building pillion (release)"
  (cd "$ROOT" && cargo build --release -q -p pillion)
  PILLION="$ROOT/target/release/pillion"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  say "nothing listens on port $1"; return 1
}

# start_nginx DIR SERVERS: nginx with one worker, the given server/upstream blocks
# inside its http { } section, files in DIR
start_nginx() {
  local dir=$1 servers=$2
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
$servers
}
CONF
  nginx -c "$dir/nginx.conf" -p "$dir" & PIDS+=($!)
}

# nginx_worker DIR: the pid of the worker of the nginx started by start_nginx in DIR
nginx_worker() {
  pgrep -f -- "nginx: worker" | while read -r p; do
    grep -q "$1" "/proc/$(ps -o ppid= -p "$p" | tr -d ' ')/cmdline" 2>/dev/null && echo "$p"
  done | head -1 || true
}

# haproxy_config MODE: the global and defaults sections every haproxy here shares,
# one thread, for mode http (connection reuse) or tcp (splice)
haproxy_config() {
  local extra="http-reuse always"
  [ "$1" = tcp ] && extra="option splice-auto"
  cat <<CONF
global
  nbthread 1
  maxconn 4000
defaults
  mode $1
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  $extra
CONF
}

# start_h2c_backend PORT: nginx answering 12 bytes over HTTP/2 (h2c, prior knowledge)
start_h2c_backend() {
  start_nginx "$WORK/h2backend" "  server { listen 127.0.0.1:$1 http2; location / { return 200 \"hello world\\n\"; } }"
  wait_port "$1"
}

# start_haproxy_h2c PORT BACKEND: haproxy with an h2c front end, to an h2c backend
start_haproxy_h2c() {
  { haproxy_config http; cat <<CONF
frontend fe
  bind 127.0.0.1:$1 proto h2
  default_backend be
backend be
  server s1 127.0.0.1:$2 proto h2
CONF
  } > "$WORK/haproxy-h2.cfg"
  haproxy -f "$WORK/haproxy-h2.cfg" -db & PIDS+=($!)
  wait_port "$1"
}

# register_h2c PILLION_PORT BACKEND: the h2c backend as service bench2, spoken to in h2c
register_h2c() {
  curl -sf -H 'Content-Type: application/json' "http://127.0.0.1:$1/registry" \
    -d "{\"name\":\"bench2\",\"nodes\":[{\"id\":\"bench2-1\",\"address\":\"127.0.0.1:$2\",\"metadata\":{\"protocol\":\"h2c\"}}]}" >/dev/null
}

# start_backend PORT: nginx, one worker, answering 12 bytes to every path
start_backend() {
  start_nginx "$WORK/backend" "  server { listen 127.0.0.1:$1 reuseport backlog=4096; location / { return 200 \"hello world\\n\"; } }"
  wait_port "$1"
}

# start_nginx_proxy PORT BACKEND_PORT
start_nginx_proxy() {
  start_nginx "$WORK/nginx-proxy" "  upstream backend { server 127.0.0.1:$2; keepalive 64; }
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
  wait_port "$1"
}

# start_haproxy PORT BACKEND_PORT
start_haproxy() {
  local dir="$WORK/haproxy"
  mkdir -p "$dir"
  { haproxy_config http; cat <<CONF
frontend fe
  bind 127.0.0.1:$1
  default_backend be
backend be
  server s1 127.0.0.1:$2
CONF
  } > "$dir/haproxy.cfg"
  haproxy -f "$dir/haproxy.cfg" -db & PIDS+=($!)
  wait_port "$1"
}

# start_pillion PORT BACKEND_PORT ARGS... : the proxy handler, one worker thread,
# with service "bench" registered at the backend
start_pillion() {
  local port=$1 backend=$2; shift 2
  RUST_LOG=warn "$PILLION" run --address "127.0.0.1:$port" --handler proxy --worker-threads 1 "$@" & PIDS+=($!)
  wait_port "$port"
  curl -sf -H 'Content-Type: application/json' "http://127.0.0.1:$port/registry" \
    -d "{\"name\":\"bench\",\"nodes\":[{\"id\":\"bench-1\",\"address\":\"127.0.0.1:$backend\"}]}" >/dev/null
}
# On a shared machine: cpu_stat before and after a run,
# busy_cores of the two for how busy the whole machine was; wait_quiet waits (up to
# QUIET_WAIT s, 60) for a second in which the machine keeps less than 0.3 core busy.
QUIET_WAIT=${QUIET_WAIT:-60}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # a process's user + system CPU, in 1/100 s
cpu_stat() { awk '/^cpu / {print $2+$3+$4+$6+$7+$8+$9, $5}' /proc/stat; }  # busy (steal included) idle, in ticks
busy_cores() { # BUSY0 IDLE0 BUSY1 IDLE1
  awk -v b0="$1" -v i0="$2" -v b1="$3" -v i1="$4" -v n="$(nproc)" \
    'BEGIN { t = (b1 - b0) + (i1 - i0); printf "%.2f", t ? n * (b1 - b0) / t : 0 }'
}
wait_quiet() {
  local end=$((SECONDS + QUIET_WAIT)) a b
  while [ "$SECONDS" -lt "$end" ]; do
    a=$(cpu_stat); sleep 1; b=$(cpu_stat)
    awk -v c="$(busy_cores $a $b)" 'BEGIN { exit !(c < 0.3) }' && return 0
  done
  say "  the machine stayed busy; measuring anyway"
}
