#!/usr/bin/env bash
# Where a message's CPU goes, relay beside Postfix, in one sitting: the system
# under test against the load it is given. smtp-source (SESSIONS sessions, N
# messages of SIZE bytes to pilot@example.com) -> relay or the Postfix anchor
# -> two smtp-sinks; no polling harness (dual_bench.sh forks a few processes
# every 50 ms), so the machine's busy time is the relay's (or Postfix's), the
# sinks', smtp-source's and the kernel's work on their behalf.
# Prints per run: msg/s end to end, then CPU ms a message: the system under test
# (the machine's busy time less the sinks' and smtp-source's own), the sinks,
# smtp-source. Throughput moves with the machine's state between sittings; the
# CPU split says whether a change moved the relay or the machine moved
# (docs/performance.md).
# Usage: [WORKERS=auto] bench/cpu_split.sh [N=2000] [SESSIONS=20] [SIZE=102400] [RUNS=2]
# Needs: postfix (smtp-source, smtp-sink), run as root; loopback only.
set -eu
N=${1:-2000}; S=${2:-20}; L=${3:-102400}; RUNS=${4:-2}; WORKERS=${WORKERS:-auto}
here=$(cd "$(dirname "$0")" && pwd)
anchors=${ANCHORS:-$here/../../shared/anchors}
work=$(mktemp -d /tmp/relay-cpu.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  bash "$anchors/pf_instance.sh" stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
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
limits: {max_connections_per_ip: 200}
metrics: {port: 0}
workers: $WORKERS
YAML

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, clock ticks
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
count() { tail -c 120 "$1" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2; }
hz=$(getconf CLK_TCK)

run() {  # TARGET NAME
  local target=$1 name=$2 r s1 s2 k0 b0 t0 t1 k1 b1 su ss c1 c2
  for r in $(seq 1 "$RUNS"); do
    /usr/sbin/smtp-sink -u postfix -c 127.0.0.1:2601 1024 >"$work/s1.log" 2>&1 & s1=$!
    /usr/sbin/smtp-sink -u postfix -c 127.0.0.1:2602 1024 >"$work/s2.log" 2>&1 & s2=$!
    pids+=("$s1" "$s2")
    for _ in $(seq 1 50); do
      ss -ltn 'sport = :2602' | grep -q LISTEN && ss -ltn 'sport = :2601' | grep -q LISTEN && break
      sleep 0.1
    done
    k0=$(( $(ticks "$s1") + $(ticks "$s2") )); b0=$(busy); t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "$work/src.time" /usr/sbin/smtp-source -s "$S" -m "$N" -l "$L" \
      -f bench@example.org -t pilot@example.com "$target"
    for _ in $(seq 1 1500); do  # both sinks have every message (bounded: 300 s)
      c1=$(count "$work/s1.log"); c2=$(count "$work/s2.log")
      [ "${c1:-0}" -ge "$N" ] && [ "${c2:-0}" -ge "$N" ] && break
      sleep 0.2
    done
    t1=$(date +%s.%N); k1=$(( $(ticks "$s1") + $(ticks "$s2") )); b1=$(busy)
    read -r su ss < "$work/src.time"
    kill "$s1" "$s2"; wait "$s1" "$s2" 2>/dev/null || true
    python3 -c "
n, hz = $N, $hz
sinks, machine = ($k1 - $k0) * 1000 / hz / n, ($b1 - $b0) * 1000 / hz / n
source = ($su + $ss) * 1000 / n
print(f'  {\"$name\":8} {n / ($t1 - $t0):5.0f} msg/s | CPU ms a message: {\"$name\"} {machine - sinks - source:.2f}'
      f', sinks {sinks:.2f}, smtp-source {source:.2f} (machine {machine:.2f})')"
  done
}

echo "N=$N sessions=$S size=$L, $RUNS runs each (workers $WORKERS)"
python3 -m relay serve -c "$work/config/relay.yaml" 2>"$work/relay.err" & relay=$!
pids+=("$relay")
for _ in $(seq 1 200); do ss -ltn 'sport = :2526' | grep -q LISTEN && break; sleep 0.1; done
sleep 2  # every worker up (the first to listen opens the port)
run 127.0.0.1:2526 relay
kill "$relay"; wait "$relay" || true
bash "$anchors/pf_instance.sh" setup >/dev/null
bash "$anchors/pf_instance.sh" start >/dev/null
run 127.0.0.1:2525 postfix
