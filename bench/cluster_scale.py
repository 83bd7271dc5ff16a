#!/usr/bin/env python3
"""N sidecars on one machine: how the cluster registry (and the etcd one) scale.

For each N: start N `pillion run` on loopback (one gossip rendezvous port of their
own), wait until every one sees the N-1 others, then
  - convergence: register a service through one, time until all N list it;
  - death: SIGKILL that one, time until no survivor lists it;
  - memory: RSS of each sidecar (median);
  - gossip: bytes sent + received per sidecar per second over CALM seconds idle;
and with REGISTRY=etcd (or both): N sidecars on one etcd, each registering an app
(--server-name), CALM seconds idle: etcd_mvcc_put_total during them and the etcd
process's CPU, then the time until a killed sidecar's app leaves the registry.

Called by bench/cluster-scale.sh (which builds pillion and installs etcd).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

PILLION = os.environ["PILLION"]
SIZES = [int(n) for n in os.environ.get("SIZES", "10 30 100").split()]
CALM = float(os.environ.get("CALM", "20"))
REGISTRY = os.environ.get("REGISTRY", "both")
ETCD = os.environ.get("ETCD", "etcd")


def free_port(kind=socket.SOCK_STREAM):
    while True:
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            u.close()


def get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def post(url, body):
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def wait_port(port, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0


class Sidecar:
    def __init__(self, args):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [PILLION, "run", "--address", f"127.0.0.1:{self.port}", "--worker-threads", "1"] + args,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, RUST_LOG="warn"))

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def status(self):
        code, body = get(self.url("/statusz"))
        return json.loads(body) if code == 200 else {}

    def lists(self, service, node):
        code, body = get(self.url(f"/registry?service={service}"))
        return code == 200 and f'"{node}"'.encode() in body

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


def until(limit, cond):
    start = time.time()
    while time.time() - start < limit:
        if cond():
            return time.time() - start
        time.sleep(0.01)
    return None


def all_see(sidecars, cond, limit):
    start = time.time()
    pending = list(sidecars)
    while pending and time.time() - start < limit:
        pending = [s for s in pending if not cond(s)]
        if pending:
            time.sleep(0.01)
    return None if pending else time.time() - start


def cluster_round(n):
    bind = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    t0 = time.time()
    sidecars = [Sidecar(["--cluster-bind", bind]) for _ in range(n)]
    for s in sidecars:
        wait_port(s.port)
    started = time.time() - t0
    formed = all_see(sidecars, lambda s: len(s.status().get("cluster", {}).get("peers", [])) == n - 1, 60)
    formed_after = time.time() - t0
    rss = median([rss_kib(s.proc.pid) for s in sidecars])
    before = [s.status()["cluster"] for s in sidecars]
    time.sleep(CALM)
    after = [s.status()["cluster"] for s in sidecars]
    gossip = median([
        (a["gossip_sent_bytes"] + a["gossip_received_bytes"] - b["gossip_sent_bytes"] - b["gossip_received_bytes"]) / CALM
        for a, b in zip(after, before)
    ])
    post(sidecars[0].url("/registry"), '{"name":"bench.scale","nodes":[{"id":"n1","address":"127.0.0.1:9"}]}')
    converge = all_see(sidecars[1:], lambda s: s.lists("bench.scale", "n1"), 30)
    sidecars[0].stop(signal.SIGKILL)
    death = all_see(sidecars[1:], lambda s: not s.lists("bench.scale", "n1"), 60)
    for s in sidecars:
        s.stop()
    for s in sidecars:
        s.proc.wait()
    return {
        "registry": "cluster", "sidecars": n, "started_s": round(started, 2),
        "formed_s": round(formed_after, 2) if formed is not None else None,
        "rss_kib_median": rss, "gossip_bytes_per_s_median": round(gossip),
        "converge_ms": round(converge * 1000) if converge is not None else None,
        "dead_gone_s": round(death, 2) if death is not None else None,
    }


def etcd_metric(port, name):
    code, body = get(f"http://127.0.0.1:{port}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def etcd_round(n):
    client, peer = free_port(), free_port()
    data = f"/tmp/pillion-scale-etcd-{os.getpid()}-{n}"
    subprocess.run(["rm", "-rf", data])
    etcd = subprocess.Popen(
        [ETCD, "--data-dir", data, "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(client)
    url = f"etcd://127.0.0.1:{client}"
    sidecars = [Sidecar(["--registry", url, "--server-name", f"app{i}", "--server-address", f"127.0.0.1:{9000 + i}",
                         "--register-ttl", "3s"]) for i in range(n)]
    for s in sidecars:
        wait_port(s.port)
    probe = sidecars[-1]
    all_see([probe], lambda s: all(get(s.url(f"/registry?service=app{i}"))[0] == 200 for i in range(n)), 60)
    time.sleep(2)
    puts0, cpu0 = etcd_metric(client, "etcd_mvcc_put_total"), cpu_secs(etcd.pid)
    time.sleep(CALM)
    puts, cpu = etcd_metric(client, "etcd_mvcc_put_total") - puts0, cpu_secs(etcd.pid) - cpu0
    sidecars[0].stop(signal.SIGKILL)
    gone = until(60, lambda: get(probe.url("/registry?service=app0"))[0] == 404)
    for s in sidecars:
        s.stop()
    for s in sidecars:
        s.proc.wait()
    etcd.terminate()
    etcd.wait()
    subprocess.run(["rm", "-rf", data])
    return {
        "registry": "etcd", "sidecars": n, "calm_s": CALM, "etcd_puts_in_calm": int(puts),
        "etcd_cpu_share": round(cpu / CALM, 3),
        "killed_app_gone_s": round(gone, 2) if gone is not None else None,
    }


def main():
    results = []
    for n in SIZES:
        if REGISTRY in ("cluster", "both"):
            print(f"cluster, {n} sidecars ...", file=sys.stderr)
            results.append(cluster_round(n))
            print(json.dumps(results[-1]), file=sys.stderr)
        if REGISTRY in ("etcd", "both"):
            print(f"etcd, {n} sidecars ...", file=sys.stderr)
            results.append(etcd_round(n))
            print(json.dumps(results[-1]), file=sys.stderr)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cluster-scale.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        print("  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
