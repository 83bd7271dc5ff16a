#!/usr/bin/env python3
"""go-micro's mDNS registry, as a go-micro service and a go-micro client do it.

Follows go-micro v2.9.1 (the first release where mDNS is the default registry; the
same in v5's internal/util/mdns): registry/mdns_registry.go (encode, decode,
Register, GetService, ListServices) and util/mdns (zone.go's records, server.go's
answers and goodbye, client.go's query and messageToEntry). DNS messages are made and
read by python-zeroconf's DNSOutgoing and DNSIncoming: nothing of pillion's.

  mdns_peer.py serve --iface IP --name N --id ID --address IP:PORT [--version V] [--meta k=v]...
      Registers one node as go-micro's mdns registry does: its zone and its service's
      "_services" wildcard zone, each answering queries (the answer sent to the
      querier, the question echoed), announced once at start. Prints "ready". On
      SIGTERM sends go-micro's goodbye (the node's records with TTL 0) and exits.
  mdns_peer.py get --iface IP --name N [--timeout S]
      GetService(N): prints the services as JSON (go-micro's registry.Service).
  mdns_peer.py list --iface IP [--timeout S]
      ListServices: prints the names as JSON.
"""

import argparse
import json
import signal
import socket
import struct
import sys
import time
import zlib

from zeroconf import (
    DNSAddress,
    DNSIncoming,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    DNSService,
    DNSText,
)

GROUP, PORT = "224.0.0.251", 5353
DOMAIN = "micro"
TTL = 120  # zone.go defaultTTL
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_AAAA, TYPE_SRV, TYPE_ANY = 1, 12, 16, 28, 33, 255
CLASS_IN = 1
FLAGS_QUERY, FLAGS_RESPONSE = 0x0000, 0x8400  # QR|AA


# registry/mdns_registry.go: encode and decode.


def encode(service, version, endpoints, metadata):
    # json.Marshal(&mdnsTxt{Service, Version, Endpoints, Metadata}), zlib, hex,
    # strings of at most 255 characters.
    raw = json.dumps(
        {"Service": service, "Version": version, "Endpoints": endpoints, "Metadata": metadata},
        separators=(",", ":"),
    ).encode()
    encoded = zlib.compress(raw).hex()
    return [encoded[i : i + 255] for i in range(0, len(encoded), 255)] or [""]


def decode(record):
    return json.loads(zlib.decompress(bytes.fromhex("".join(record))))


def txt_rdata(strings):
    return b"".join(bytes([len(s)]) + s.encode() for s in strings)


def txt_strings(rdata):
    out, i = [], 0
    while i < len(rdata):
        n = rdata[i]
        out.append(rdata[i + 1 : i + 1 + n].decode())
        i += 1 + n
    return out


def hostname():
    return socket.gethostname() + "."


class Zone:
    """util/mdns/zone.go's MDNSService: the records of one instance."""

    def __init__(self, instance, service, port, ip, txt):
        self.service_addr = f"{service}.{DOMAIN}."
        self.instance_addr = f"{instance}.{service}.{DOMAIN}."
        self.host = hostname()
        self.port = port
        self.ip = ip
        self.txt = txt
        self.ttl = TTL

    def records(self, name, qtype):
        if name == self.service_addr and qtype in (TYPE_PTR, TYPE_ANY):
            ptr = DNSPointer(name, TYPE_PTR, CLASS_IN, self.ttl, self.instance_addr)
            return [ptr] + self.records(self.instance_addr, TYPE_ANY)
        if name == self.instance_addr:
            if qtype == TYPE_ANY:
                return self.records(name, TYPE_SRV) + self.records(name, TYPE_TXT)
            if qtype == TYPE_SRV:
                srv = DNSService(name, TYPE_SRV, CLASS_IN, self.ttl, 10, 1, self.port, self.host)
                return [srv] + self.address()
            if qtype == TYPE_TXT:
                return [DNSText(name, TYPE_TXT, CLASS_IN, self.ttl, txt_rdata(self.txt))]
        if name == self.host and qtype == TYPE_A:
            return self.address()
        return []

    def address(self):
        return [DNSAddress(self.host, TYPE_A, CLASS_IN, self.ttl, socket.inet_aton(self.ip))]


def response(records, questions=(), id_=0):
    out = DNSOutgoing(FLAGS_RESPONSE, multicast=False, id_=id_)
    for q in questions:
        out.add_question(q)
    for r in records:
        out.add_answer_at_time(r, 0)
    return out.packets()


def multicast_socket(iface, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
    s.setsockopt(
        socket.IPPROTO_IP,
        socket.IP_ADD_MEMBERSHIP,
        socket.inet_aton(GROUP) + socket.inet_aton(iface),
    )
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return s


def serve(args):
    host, port = args.address.rsplit(":", 1)
    metadata = dict(kv.split("=", 1) for kv in args.meta)
    endpoints = [
        {
            "name": "Say.Hello",
            "request": {"name": "Request", "type": "Request", "values": [{"name": "name", "type": "string", "values": None}]},
            "response": {"name": "Response", "type": "Response", "values": [{"name": "msg", "type": "string", "values": None}]},
            "metadata": {"stream": "false"},
        }
    ]
    # mdnsRegistry.Register: the wildcard zone, then the node's zone.
    wildcard = Zone(args.name, "_services", 9999, "0.0.0.0", [])
    node = Zone(args.id, args.name, int(port), host, encode(args.name, args.version, endpoints, metadata))
    zones = [wildcard, node]
    sock = multicast_socket(args.iface, PORT)

    def goodbye(*_):
        # server.go unregister: TTL 0, the instance's records (ANY), multicast.
        node.ttl = 0
        for packet in response(node.records(node.instance_addr, TYPE_ANY)):
            sock.sendto(packet, (GROUP, PORT))
        sys.exit(0)

    signal.signal(signal.SIGTERM, goodbye)
    # server.go probe: the announcement, the instance's records with no question.
    for packet in response(node.records(node.instance_addr, TYPE_ANY)):
        sock.sendto(packet, (GROUP, PORT))
    print("ready", flush=True)
    while True:
        data, sender = sock.recvfrom(65536)
        msg = DNSIncoming(data)
        if not msg.valid or not msg.is_query():
            continue
        # server.go handleQuery: each zone is its own server and answers alone,
        # to the address the query came from, the questions echoed.
        for zone in zones:
            records = []
            for q in msg.questions:
                records += zone.records(q.name, q.type)
            if records:
                for packet in response(records, msg.questions):
                    sock.sendto(packet, sender)


def query(args, service):
    """client.go query: one PTR question from a unicast socket, answers gathered into
    entries by messageToEntry until the timeout; only answers that echo the question."""
    name = f"{service}.{DOMAIN}."
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.bind((args.iface, 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(args.iface))
    out = DNSOutgoing(FLAGS_QUERY)
    out.add_question(DNSQuestion(name, TYPE_PTR, CLASS_IN))
    for packet in out.packets():
        sock.sendto(packet, (GROUP, PORT))
    inprogress, entries = {}, []
    deadline = time.monotonic() + args.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return entries
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65536)
        except socket.timeout:
            return entries
        msg = DNSIncoming(data)
        if not msg.valid or not msg.questions or msg.questions[0].name != name:
            continue
        inp = None
        for rr in msg.answers():
            if isinstance(rr, DNSPointer):
                inp = inprogress.setdefault(rr.alias, {"name": rr.alias})
            elif isinstance(rr, DNSService):
                if rr.server != rr.name:
                    inprogress[rr.server] = inprogress.setdefault(rr.name, {"name": rr.name})
                inp = inprogress.setdefault(rr.name, {"name": rr.name})
                inp.update(port=rr.port, host=rr.server)
            elif isinstance(rr, DNSText):
                inp = inprogress.setdefault(rr.name, {"name": rr.name})
                inp["txt"] = txt_strings(rr.text)
            elif isinstance(rr, DNSAddress) and len(rr.address) == 4:
                inp = inprogress.setdefault(rr.name, {"name": rr.name})
                inp["ip"] = socket.inet_ntoa(rr.address)
            if inp is not None:
                inp["ttl"] = rr.ttl
        complete = inp and "ip" in inp and inp.get("port") and "txt" in inp
        if complete and not inp.get("sent"):
            inp["sent"] = True
            entries.append(dict(inp))


def get(args):
    # mdnsRegistry.GetService.
    services = {}
    for e in query(args, args.name):
        if e["ttl"] == 0:
            continue
        try:
            txt = decode(e["txt"])
        except Exception:
            continue
        if txt["Service"] != args.name:
            continue
        s = services.setdefault(
            txt["Version"],
            {"name": txt["Service"], "version": txt["Version"], "endpoints": txt["Endpoints"], "nodes": []},
        )
        s["nodes"].append(
            {
                "id": e["name"][: -len(f".{args.name}.{DOMAIN}.")],
                "address": f"{e['ip']}:{e['port']}",
                "metadata": txt["Metadata"],
            }
        )
    print(json.dumps(list(services.values())))


def list_services(args):
    # mdnsRegistry.ListServices: the wildcard instances' names.
    names = []
    for e in query(args, "_services"):
        name = e["name"][: -len(f"._services.{DOMAIN}.")]
        if e["ttl"] and name not in names:
            names.append(name)
    print(json.dumps(sorted(names)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["serve", "get", "list"])
    p.add_argument("--iface", required=True)
    p.add_argument("--name")
    p.add_argument("--id")
    p.add_argument("--address")
    p.add_argument("--version", default="latest")
    p.add_argument("--meta", action="append", default=[])
    p.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args()
    {"serve": serve, "get": get, "list": list_services}[args.command](args)


if __name__ == "__main__":
    main()
