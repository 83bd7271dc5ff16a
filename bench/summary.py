"""Writes BENCHMARKS.md and bench/results/summary.csv from bench/results/*.json."""
import csv
import datetime
import json
import os
import platform
import subprocess

here = os.path.dirname(os.path.abspath(__file__))
results = os.path.join(here, "results")


def load(name):
    path = os.path.join(results, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None


def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


rows = []  # (scenario, target, metric, value)
md = ["# Benchmarks", ""]
md.append(
    f"Machine: {os.cpu_count()} cores ({cpu()}), Linux {platform.release()}, "
    f"written {datetime.date.today()}. Reproduce with `bench/run` (one command; it installs "
    "what it needs). Every proxy runs on one worker thread; runs are interleaved and "
    "each figure is a median over rounds. Ratios are what count: absolute numbers move "
    "between machines."
)
md.append("")

h = load("http-proxy")
if h:
    md += ["## HTTP/1.1 keep-alive (wrk -t1 -c32, 12-byte responses)", "",
           "| target | req/s | p50 ms | p99 ms | req/s vs haproxy | p99 vs haproxy | req/s vs direct |",
           "|---|---|---|---|---|---|---|"]
    for t, r in h["results"].items():
        md.append(f"| {t} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r.get('rps_vs_haproxy', 0):.2f} | {r.get('p99_vs_haproxy', 0):.2f} | {r.get('rps_vs_direct', 0):.2f} |")
        rows += [("http-keepalive", t, "rps", r["rps"]), ("http-keepalive", t, "p99_ms", r["p99_ms"])]
    md.append("")

x = load("http-extra")
if x:
    md += [f"## HTTP: fixed rate ({x['fixed_rate']} req/s, 50% of haproxy's maximum, open loop), h2c, new connections, memory", "",
           "| target | p50 ms | p99 ms | p99.9 ms | added p99 vs direct | h2c req/s | new-connection req/s | RSS idle MB | RSS 1,000 conns MB | private idle / 1,000 conns MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for t, r in x["results"].items():
        md.append(f"| {t} | {r.get('fixed_p50_ms', 0):.2f} | {r.get('fixed_p99_ms', 0):.2f} | {r.get('fixed_p999_ms', 0):.2f} | {r.get('added_p99_ms', 0):.2f} | {r.get('h2c_rps', 0):.0f} | {r.get('new_conn_rps', 0):.0f} | {r.get('rss_idle_mb', 0):.1f} | {r.get('rss_1000_conns_mb', 0):.1f} | {r.get('private_idle_mb', 0):.1f} / {r.get('private_1000_conns_mb', 0):.1f} |")
        for k in ("fixed_p99_ms", "h2c_rps", "new_conn_rps", "rss_idle_mb", "rss_1000_conns_mb", "private_idle_mb", "private_1000_conns_mb"):
            if k in r:
                rows.append(("http-extra", t, k, r[k]))
    md.append("")

tcp = load("tcp-proxy")
if tcp:
    md += ["## TCP proxy (iperf3; wrk with Connection: close for the connection rate)", "",
           "| target | Gbit/s | connections/s | Gbit/s vs haproxy | conn/s vs haproxy |", "|---|---|---|---|---|"]
    for t, r in tcp["results"].items():
        md.append(f"| {t} | {r['gbit_per_sec']:.1f} | {r['connections_per_sec']:.0f} | {r['gbit_vs_haproxy']:.2f} | {r['conn_vs_haproxy']:.2f} |")
        rows += [("tcp", t, "gbit_per_sec", r["gbit_per_sec"]), ("tcp", t, "connections_per_sec", r["connections_per_sec"])]
    md.append("")

b = load("broker")
if b:
    md += [f"## Broker ({b['concurrency']} closed-loop publishers, or `stream-*`: one connection with {b.get('window', '-')} messages in flight; one subscriber)", "",
           "`stream-embedded` and `stream-nats` publish over one websocket (`publish=1`), compared with `stream-direct`, one NATS connection to nats-server.", "",
           "| target | msgs/s | p50 ms | p99 ms | msgs/s vs direct | lost |", "|---|---|---|---|---|---|"]
    for t, r in b["results"].items():
        md.append(f"| {t} | {r['msgs_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['msgs_vs_direct']:.2f} | {r['lost']} |")
        rows += [("broker", t, "msgs_per_sec", r["msgs_per_sec"]), ("broker", t, "p99_ms", r["p99_ms"])]
    md.append("")

f = load("broker-fanout")
if f:
    md += [f"## Broker across sidecars (embedded, {f['concurrency']} closed-loop publishers on A, a websocket subscriber on B)", "",
           "| path | msgs/s accepted, all delivered |", "|---|---|",
           f"| A -> B (two sidecars) | {f['across_msgs_per_sec']:.0f} |",
           f"| A -> A (one sidecar, reference) | {f['local_msgs_per_sec']:.0f} |",
           f"| nats-server directly, same loop | {f['nats_direct_msgs_per_sec']:.0f} |", ""]
    rows += [("broker-fanout", "across", "msgs_per_sec", f["across_msgs_per_sec"]),
             ("broker-fanout", "local", "msgs_per_sec", f["local_msgs_per_sec"])]

m = load("mesh-hop")
if m:
    md += [f"## A call by name at a fixed {m['rate']} req/s: one plain hop vs two sidecars over mTLS", "",
           "| path | p50 ms | p99 ms | p99.9 ms |", "|---|---|---|---|"]
    for t, r in m["results"].items():
        md.append(f"| {t} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p999_ms']:.3f} |")
        rows += [("mesh-hop", t, "p50_ms", r["p50_ms"]), ("mesh-hop", t, "p99_ms", r["p99_ms"])]
    a = m["mesh_added_over_plain"]
    md += ["", f"The mesh adds {a['p50_ms']:+.3f} ms p50 and {a['p99_ms']:+.3f} ms p99 over the plain hop.", ""]

root = os.path.dirname(here)
open(os.path.join(root, "BENCHMARKS.md"), "w").write("\n".join(md))
with open(os.path.join(results, "summary.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["scenario", "target", "metric", "value"])
    w.writerows(rows)
print("\n".join(md))
