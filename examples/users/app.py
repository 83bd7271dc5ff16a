#!/usr/bin/env python3
"""The users service of the pillion walkthrough: Python's standard library only.

    PORT=3001 SIDECAR=http://127.0.0.1:8081 python3 examples/users/app.py

GET  /health            200 {"status": "ok"}
GET  /users/{id}        the user
GET  /users/{id}/todos  the user with its todos, asked of the todos service by name
                        through this app's sidecar: $SIDECAR/invoke/todos/todos?user={id}
POST /login             logs in user {"id": N} (42 without a body): answers pillion's
                        session headers X-Session-Set-User-Id and X-Session-Rotate
GET  /me                who is logged in, from the X-Session-User-Id header pillion
                        adds (401 without a session)
"""

import json
import os
import re
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "3001"))
SIDECAR = os.environ.get("SIDECAR", "http://127.0.0.1:8081").rstrip("/")

USERS = {
    1: {"id": 1, "name": "Ada Lovelace"},
    2: {"id": 2, "name": "Alan Turing"},
    42: {"id": 42, "name": "Grace Hopper"},
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return None

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.answer(200, {"status": "ok"})
        if path == "/me":
            user_id = self.headers.get("X-Session-User-Id")
            if not user_id:
                return self.answer(401, {"error": "not logged in"})
            user = USERS.get(int(user_id)) if user_id.isdigit() else None
            return self.answer(200, {"logged_in": user or {"id": user_id}})
        m = re.fullmatch(r"/users/(\d+)(/todos)?", path)
        if not m:
            return self.answer(404, {"error": f"no route {path}"})
        user = USERS.get(int(m.group(1)))
        if user is None:
            return self.answer(404, {"error": f"no user {m.group(1)}"})
        if not m.group(2):
            return self.answer(200, user)
        # The todos service by name: the sidecar finds a healthy node of it.
        url = f"{SIDECAR}/invoke/todos/todos?user={user['id']}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                todos = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError) as err:
            return self.answer(502, {"error": f"todos service: {err}"})
        return self.answer(200, dict(user, todos=todos))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path != "/login":
            return self.answer(404, {"error": f"no route {path}"})
        body = self.body()
        if body is None or not isinstance(body, dict):
            return self.answer(400, {"error": "the body is not a JSON object"})
        user_id = body.get("id", 42)
        if not isinstance(user_id, int) or user_id not in USERS:
            return self.answer(404, {"error": f"no user {user_id}"})
        # pillion stores these in the visitor's session and sends the cookie.
        self.answer(
            200,
            {"logged_in": USERS[user_id]},
            [("X-Session-Set-User-Id", str(user_id)), ("X-Session-Rotate", "1")],
        )

    def log_message(self, fmt, *args):
        sys.stderr.write("users: " + (fmt % args) + "\n")


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"users listening on 127.0.0.1:{PORT}, sidecar {SIDECAR}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
