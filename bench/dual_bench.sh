#!/usr/bin/env bash
# Side-by-side throughput: relay vs the Postfix anchor, same harness, same sitting.
# smtp-source (SESSIONS sessions, N messages of SIZE bytes to pilot@example.com)
# -> relay or Postfix -> two smtp-sinks (legacy :2601, new :2602); figures are
# messages/s until BOTH sinks counted N, ingress msg/s, and peak RSS/PSS.
# Usage: [WORKERS=auto] bench/dual_bench.sh [N=3000] [SESSIONS=20] [SIZE=10240] [RUNS=3]
# WORKERS: the relay's `workers:` (default: the shipped default, auto); RSS/PSS sum the tree.
# Needs: postfix (smtp-source, smtp-sink), run as root; loopback only.
set -eu
N=${1:-3000}; S=${2:-20}; L=${3:-10240}; RUNS=${4:-3}; WORKERS=${WORKERS:-auto}
here=$(cd "$(dirname "$0")" && pwd)
anchors=${ANCHORS:-$here/../../shared/anchors}
work=$(mktemp -d /tmp/relay-bench.XXXXXX)
relay_pid=""
cleanup() { [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT INT TERM

mkdir -p "$work/config"
cat > "$work/config/pilot-users.yaml" <<YAML
new_domains: {example.com: new.example.net}
pilots:
  - {address: pilot@example.com, group: bench}
YAML
cat > "$work/config/relay.yaml" <<YAML
listen: {host: 127.0.0.1, port: 2526, hostname: relay.bench.invalid}
node: bench
domains: [example.com]
providers:
  legacy: {host: 127.0.0.1, port: 2601}
  new: {host: 127.0.0.1, port: 2602}
spool: ../spool
log: ../deliveries.jsonl
# every client is 127.0.0.1 here: a real MX's 20 sessions come from many addresses
limits: {max_connections_per_ip: 200}
metrics: {port: 0}
workers: $WORKERS
YAML
python3 -m relay serve -c "$work/config/relay.yaml" 2>"$work/relay.err" &
relay_pid=$!
echo "$relay_pid" > "$work/relay.pid"
for _ in $(seq 1 100); do ss -ltn 'sport = :2526' | grep -q LISTEN && break; sleep 0.1; done

echo "== relay (python, pid $relay_pid, workers $WORKERS)"
bash "$anchors/pf_dual_bench.sh" "$N" "$S" "$L" "$RUNS" 127.0.0.1:2526 "$work/relay.pid" | tee "$work/relay.out"
kill "$relay_pid"; wait "$relay_pid" || true; relay_pid=""

echo "== postfix anchor"
bash "$anchors/pf_instance.sh" setup >/dev/null
bash "$anchors/pf_instance.sh" start >/dev/null
bash "$anchors/pf_dual_bench.sh" "$N" "$S" "$L" "$RUNS" | tee "$work/pf.out"
bash "$anchors/pf_instance.sh" stop >/dev/null

echo
echo "side by side (N=$N sessions=$S size=$L, medians of $RUNS runs):"
grep SUMMARY "$work/relay.out" | sed "s/^SUMMARY/  relay (workers $WORKERS)/"
grep SUMMARY "$work/pf.out" | sed 's/^SUMMARY/  postfix/'
