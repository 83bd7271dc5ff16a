#!/usr/bin/env bash
# N sidecars on this machine, for the cluster registry and for etcd: start time,
# time to form the cluster, convergence of a registration, time until a killed
# sidecar's registrations leave, memory per sidecar, gossip bytes/s per sidecar when
# idle, and (etcd) puts and etcd CPU during CALM idle seconds.
#
#   bench/cluster-scale.sh                         # N = 10, 30, 100; both registries
#   SIZES="30 100" REGISTRY=cluster CALM=10 bench/cluster-scale.sh
#
# Prints one line per run and writes bench/results/cluster-scale.json.
source "$(dirname "$0")/lib.sh"
install_tools etcd:etcd-server python3:python3
build_pillion
ulimit -n 65536 2>/dev/null || true
PILLION="$PILLION" ETCD="$(command -v etcd || echo /usr/bin/etcd)" python3 "$BENCH_DIR/cluster_scale.py"
