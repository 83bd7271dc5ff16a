#!/usr/bin/env python3
# A manual check, not part of CI: runs a sidecar with --otlp-endpoint pointed at a
# small collector here, makes three calls (child of a traceparent, a new trace, an
# error), and parses what it exports with the official OTLP protobuf schema.
#   pip install opentelemetry-proto
#   python3 scripts/otlp-schema-check.py target/debug/pillion
import http.server, json, socket, subprocess, sys, threading, time, urllib.request, os
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
bodies = []
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get('content-length', 0)); b = self.rfile.read(n)
        if self.path == '/v1/traces': bodies.append(b)
        self.send_response(200); self.send_header('content-length', '2'); self.end_headers(); self.wfile.write(b'{}')
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H); port = srv.server_address[1]
threading.Thread(target=srv.serve_forever, daemon=True).start()
def free():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
api = free(); gossip = free()
p = subprocess.Popen([sys.argv[1], 'run', '--address', f'127.0.0.1:{api}', '--registry', 'memory',
    '--otlp-endpoint', f'http://127.0.0.1:{port}'], env={**os.environ, 'PILLION_CLUSTER_BIND': f'127.0.0.1:{gossip}'})
try:
    for _ in range(100):
        try: urllib.request.urlopen(f'http://127.0.0.1:{api}/healthz'); break
        except Exception: time.sleep(0.1)
    def post(path, body, h={}):
        r = urllib.request.Request(f'http://127.0.0.1:{api}{path}', data=body.encode(), headers={'content-type': 'application/json', **h})
        try: return urllib.request.urlopen(r).status
        except urllib.error.HTTPError as e: return e.code
    post('/registry', json.dumps({'name': 'greeter', 'nodes': [{'id': 'g1', 'address': f'127.0.0.1:{port}'}]}))
    post('/registry', json.dumps({'name': 'down', 'nodes': [{'id': 'd1', 'address': f'127.0.0.1:{free()}'}]}))
    print('ok call', post('/greeter/hello', '{}', {'traceparent': '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', 'tracestate': 'congo=t61rcWkgMzE'}))
    print('root call', post('/greeter/hello', '{}'))
    print('error call', post('/down/x', '{}'))
    for _ in range(50):
        if sum(len(json.loads(b)['resourceSpans'][0]['scopeSpans'][0]['spans']) for b in bodies) >= 3: break
        time.sleep(0.1)
    for b in bodies:
        import base64
        doc = json.loads(b)
        # OTLP/JSON writes ids as hex where the plain protobuf mapping has base64:
        # convert them, then parse with the official schema, unknown fields refused.
        for s in doc['resourceSpans'][0]['scopeSpans'][0]['spans']:
            for k in ('traceId', 'spanId', 'parentSpanId'):
                if k in s: s[k] = base64.b64encode(bytes.fromhex(s[k])).decode()
        msg = json_format.Parse(json.dumps(doc), ExportTraceServiceRequest())
        print('parsed OK (official ExportTraceServiceRequest schema):', len(msg.resource_spans[0].scope_spans[0].spans), 'spans')
        for s in msg.resource_spans[0].scope_spans[0].spans:
            print(' ', s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.trace_state, s.status.code, [(a.key, a.value.string_value or a.value.int_value) for a in s.attributes])
    
finally:
    p.terminate(); p.wait()
