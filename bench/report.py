"""Turns raw bench lines `target rps p50 p99` into a table of medians and ratios."""
import json
import statistics
import sys


def ms(text):
    """wrk latency ('812.00us', '1.23ms', '2.00s') in milliseconds."""
    for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


raw, out, title = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {}
for line in open(raw):
    target, rps, p50, p99 = line.split()
    runs.setdefault(target, []).append((float(rps), ms(p50), ms(p99)))

rows = {}
for target, samples in runs.items():
    rows[target] = {
        "rps": statistics.median(s[0] for s in samples),
        "p50_ms": statistics.median(s[1] for s in samples),
        "p99_ms": statistics.median(s[2] for s in samples),
        "rounds": len(samples),
    }

base = rows.get("haproxy")
direct = rows.get("direct")
print(title)
print(f"{'target':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'rps/haproxy':>12} {'p99/haproxy':>12} {'rps/direct':>11}")
for target, r in rows.items():
    if base:
        r["rps_vs_haproxy"] = r["rps"] / base["rps"]
        r["p99_vs_haproxy"] = r["p99_ms"] / base["p99_ms"]
    if direct:
        r["rps_vs_direct"] = r["rps"] / direct["rps"]
    print(
        f"{target:<10} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        f" {r.get('rps_vs_haproxy', 0):>12.2f} {r.get('p99_vs_haproxy', 0):>12.2f} {r.get('rps_vs_direct', 0):>11.2f}"
    )
json.dump({"title": title, "results": rows}, open(out, "w"), indent=2)
print(f"written to {out}")
