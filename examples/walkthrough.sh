#!/usr/bin/env bash
# The pillion walkthrough: two apps (users in Python, todos in Node), a sidecar beside
# each, and what the sidecars give them:
#   1. both services registered, kept true by a health check
#   2. each app calls the other by name
#   3. publish and subscribe across sidecars
#   4. a session kept by the sidecar in front of the users app
#
#   cargo build --release -p pillion && examples/walkthrough.sh
#
# PILLION names the binary (default target/release/pillion if built, else
# target/debug/pillion). Every port is picked free at start, so several runs may go
# at once. Exits non-zero, saying which check failed, if one does.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXAMPLES="$ROOT/examples"
if [[ -z "${PILLION:-}" ]]; then
  if [[ -x "$ROOT/target/release/pillion" ]]; then
    PILLION="$ROOT/target/release/pillion"
  else
    PILLION="$ROOT/target/debug/pillion"
  fi
fi
[[ -x "$PILLION" ]] || { echo "walkthrough: no pillion binary at $PILLION: run 'cargo build --release -p pillion' first, or set PILLION" >&2; exit 1; }
command -v python3 >/dev/null || { echo "walkthrough: python3 is needed (the users app)" >&2; exit 1; }
command -v node >/dev/null || { echo "walkthrough: node is needed (the todos app)" >&2; exit 1; }
command -v curl >/dev/null || { echo "walkthrough: curl is needed" >&2; exit 1; }

# The CLI's default sidecar and token must not come from the caller's environment.
unset PILLION_SIDECAR PILLION_API_TOKEN

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pillion-walkthrough.XXXXXX")
PIDS=()

cleanup() {
  local status=$? pid deadline
  trap - EXIT INT TERM
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  # Sidecars deregister their app and exit; give them 5 s, then kill what is left.
  deadline=$((SECONDS + 5))
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  local log
  echo >&2
  echo "walkthrough FAILED: $*" >&2
  for log in "$WORK"/*.log; do
    [[ -s "$log" ]] || continue
    echo "--- last lines of $(basename "$log")" >&2
    tail -n 15 "$log" >&2
  done
  echo "(pillion was $PILLION: a build older than this walkthrough may lack what it shows; 'cargo build --release -p pillion' makes a new one)" >&2
  exit 1
}

# A word as a shell reader would type it: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command as typed.
say() {
  local word line='$'
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
}

# `pillion ...` in the commands shown runs $PILLION.
pillion() { "$PILLION" "$@"; }

# Prints the command, runs it, keeps its output in OUT and prints it.
OUT=
show() {
  say "$@"
  if ! OUT=$("$@" 2>&1); then
    echo "$OUT"
    fail "'$*' failed"
  fi
  echo "$OUT"
}

# Checks OUT (JSON, bound to d) with a Python expression.
expect_json() {
  local what=$1 expr=$2
  python3 - "$OUT" "$expr" <<'PY' || fail "$what (got: $OUT)"
import json, sys
try:
    d = json.loads(sys.argv[1])
    ok = eval(sys.argv[2])
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
  echo "ok: $what"
}

# Checks that OUT has a line matching the (extended, case-insensitive) regex.
expect_line() {
  local what=$1 regex=$2
  grep -Eiq -- "$regex" <<<"$OUT" || fail "$what (got: $OUT)"
  echo "ok: $what"
}

# Waits, at most LIMIT seconds, until COMMAND succeeds; fails naming WHAT. A process
# of ours that died meanwhile fails it at once.
wait_for() {
  local limit=$1 what=$2 i
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    for ((i = 0; i < ${#DAEMONS[@]}; i++)); do
      kill -0 "${DAEMONS[i]}" 2>/dev/null || fail "$what: the ${DAEMON_NAMES[i]} exited (see its log below)"
    done
    ((SECONDS < deadline)) || fail "$what: not within ${limit}s"
    sleep 0.1
  done
}

# Starts a background process meant to run to the end, its output in $WORK/NAME.log.
DAEMONS=()
DAEMON_NAMES=()
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  DAEMONS+=($!)
  DAEMON_NAMES+=("$name")
}

step() {
  echo
  echo "== $*"
}

# Free ports, all held at once while picked so they differ: five TCP (users app,
# todos app, users sidecar, todos sidecar, users inbound proxy) and two UDP (gossip).
read -r USERS_PORT TODOS_PORT USERS_SIDECAR_PORT TODOS_SIDECAR_PORT LISTEN_PORT USERS_GOSSIP TODOS_GOSSIP < <(
  python3 -c '
import socket
held = []
for kind in [socket.SOCK_STREAM] * 5 + [socket.SOCK_DGRAM] * 2:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
')
USERS_SIDECAR="http://127.0.0.1:$USERS_SIDECAR_PORT"
TODOS_SIDECAR="http://127.0.0.1:$TODOS_SIDECAR_PORT"
USERS_APP="http://127.0.0.1:$USERS_PORT"
TODOS_APP="http://127.0.0.1:$TODOS_PORT"
PROXY="http://127.0.0.1:$LISTEN_PORT"
CURL=(curl -sS --max-time 10)

step "0. Start the two apps, and a sidecar beside each"
echo "# pillion is $PILLION ($("$PILLION" --version))"
say PORT="$USERS_PORT" SIDECAR="$USERS_SIDECAR" python3 examples/users/app.py '&'
start users-app env PORT="$USERS_PORT" SIDECAR="$USERS_SIDECAR" python3 "$EXAMPLES/users/app.py"
say PORT="$TODOS_PORT" SIDECAR="$TODOS_SIDECAR" node examples/todos/app.js '&'
start todos-app env PORT="$TODOS_PORT" SIDECAR="$TODOS_SIDECAR" node "$EXAMPLES/todos/app.js"
wait_for 10 "the users app answering $USERS_APP/health" curl -sf --max-time 1 "$USERS_APP/health"
wait_for 10 "the todos app answering $TODOS_APP/health" curl -sf --max-time 1 "$TODOS_APP/health"

# The users sidecar: registers users, health-checked; in front of the users app
# (--listen/--app) it keeps the visitors' sessions (embedded store). Its gossip
# address is the cluster's seed.
users_sidecar=(pillion run --address "127.0.0.1:$USERS_SIDECAR_PORT"
  --server-name users --server-address "127.0.0.1:$USERS_PORT"
  --healthcheck-url "$USERS_APP/health" --healthcheck-interval 1s
  --listen "127.0.0.1:$LISTEN_PORT" --app "$USERS_APP")
say PILLION_CLUSTER_BIND="127.0.0.1:$USERS_GOSSIP" "${users_sidecar[@]}" '&'
start users-sidecar env PILLION_CLUSTER_BIND="127.0.0.1:$USERS_GOSSIP" "$PILLION" "${users_sidecar[@]:1}"
# The todos sidecar: registers todos, and joins the users sidecar's cluster.
todos_sidecar=(pillion run --address "127.0.0.1:$TODOS_SIDECAR_PORT"
  --server-name todos --server-address "127.0.0.1:$TODOS_PORT"
  --healthcheck-url "$TODOS_APP/health" --healthcheck-interval 1s
  --cluster-join "127.0.0.1:$USERS_GOSSIP")
say PILLION_CLUSTER_BIND="127.0.0.1:$TODOS_GOSSIP" "${todos_sidecar[@]}" '&'
start todos-sidecar env PILLION_CLUSTER_BIND="127.0.0.1:$TODOS_GOSSIP" "$PILLION" "${todos_sidecar[@]:1}"
wait_for 10 "the users sidecar answering $USERS_SIDECAR/healthz" curl -sf --max-time 1 "$USERS_SIDECAR/healthz"
wait_for 10 "the todos sidecar answering $TODOS_SIDECAR/healthz" curl -sf --max-time 1 "$TODOS_SIDECAR/healthz"
# Each sidecar lists both services once the registrations have gossiped.
for sidecar in "$USERS_SIDECAR" "$TODOS_SIDECAR"; do
  for service in users todos; do
    wait_for 10 "service $service listed by the sidecar at $sidecar" \
      curl -sf --max-time 1 "$sidecar/registry?service=$service"
  done
done

step "1. Both services are registered: each sidecar lists them"
show pillion services --sidecar "$TODOS_SIDECAR"
expect_line "the todos sidecar lists users" '^users[[:space:]]'
expect_line "the todos sidecar lists todos" '^todos[[:space:]]'
show pillion services todos --sidecar "$USERS_SIDECAR"
expect_line "the users sidecar knows the todos node at 127.0.0.1:$TODOS_PORT" "127\.0\.0\.1:$TODOS_PORT"

step "2. Each app calls the other by name, through its own sidecar"
echo "# users asks its sidecar for $USERS_SIDECAR/invoke/todos/todos?user=1"
show "${CURL[@]}" "$USERS_APP/users/1/todos"
expect_json "users got Ada's 2 todos from the todos service" \
  'd["name"] == "Ada Lovelace" and len(d["todos"]) == 2 and d["todos"][0]["title"] == "write the first program"'
echo "# todos asks its sidecar for $TODOS_SIDECAR/invoke/users/users/2"
show "${CURL[@]}" "$TODOS_APP/todos/3"
expect_json "todos got the owner of todo 3 from the users service" \
  'd["title"] == "break the enigma" and d["owner"] == {"id": 2, "name": "Alan Turing"}'

step "3. Publish and subscribe: a subscriber on the users sidecar gets the todo.created event the todos app publishes on its own sidecar"
say pillion subscribe todo.created --count 1 --sidecar "$USERS_SIDECAR" '&'
"$PILLION" subscribe todo.created --count 1 --sidecar "$USERS_SIDECAR" >"$WORK/subscriber.out" 2>"$WORK/subscriber.log" &
SUBSCRIBER=$!
PIDS+=("$SUBSCRIBER")
wait_for 10 "the subscriber subscribed" grep -q "subscribed to" "$WORK/subscriber.log"
cat "$WORK/subscriber.log"
# The users sidecar registered itself as pillion.broker (it has a subscriber); the
# todos sidecar sends it the message once gossip has told it so.
broker_subscribed() {
  curl -sf --max-time 1 "$TODOS_SIDECAR/registry?service=pillion.broker" | grep -q 'todo\.created'
}
wait_for 10 "the todos sidecar seeing the users sidecar's subscriber" broker_subscribed
show "${CURL[@]}" -X POST -H 'Content-Type: application/json' \
  -d '{"user":42,"title":"try pillion"}' "$TODOS_APP/todos"
expect_json "todos created the todo" 'd["title"] == "try pillion" and d["user"] == 42'
deadline=$((SECONDS + 10))
while kill -0 "$SUBSCRIBER" 2>/dev/null; do
  ((SECONDS < deadline)) || fail "the subscriber got no message within 10s"
  sleep 0.1
done
wait "$SUBSCRIBER" || fail "the subscriber exited with status $? ($(cat "$WORK/subscriber.log"))"
PIDS=("${DAEMONS[@]}") # the subscriber is gone: nothing of it to stop
echo "# the subscriber printed:"
OUT=$(cat "$WORK/subscriber.out")
echo "$OUT"
expect_json "the subscriber got the new todo, with its owner's name" \
  'd["title"] == "try pillion" and d["owner"] == "Grace Hopper"'

step "4. A session: the users sidecar, in front of the users app ($PROXY), keeps who is logged in"
JAR="$WORK/cookies.txt"
show "${CURL[@]}" -i -c "$JAR" -X POST -H 'Content-Type: application/json' -d '{"id":42}' "$PROXY/login"
expect_line "the login set the session cookie" '^set-cookie: session='
if grep -qi '^x-session-' <<<"$OUT"; then fail "the app's X-Session-* headers reached the client"; fi
echo "ok: the app's X-Session-* headers stayed in the sidecar"
show "${CURL[@]}" -b "$JAR" "$PROXY/me"
expect_json "with the cookie, /me answers user 42" 'd["logged_in"] == {"id": 42, "name": "Grace Hopper"}'
show "${CURL[@]}" -i -H 'X-Session-User-Id: 1' "$PROXY/me"
expect_line "without the cookie, a forged X-Session-User-Id header gets 401" '^HTTP/[0-9.]+ 401'

echo
echo "walkthrough: all 4 steps passed"
