#!/bin/sh
# Footprint of `immp top` at 1 Hz with about 500 live processes: CPU % of one core and RSS,
# the TUI running in a real pseudo-terminal (tmux, 160x50). The same measurement as
# `cargo xtask bench agent` makes of `immp profile`; meant to become `bench agent --top`.
#
#   sh immp-user/examples/top_footprint.sh [PROCS] [SECONDS]     (as root, from the repo)
#
# Goal: < 2 % of one core and < 40 MB RSS. Needs tmux. Leaves nothing running or capped
# (a journal of its own; no key that caps is sent).
set -eu
PROCS=${1:-500}
SECS=${2:-30}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --quiet --release -p immp-user -p immp-tests --bins
IMMP=$TARGET/release/immp
WL=$TARGET/release/immp-workload
SOCK=immp-footprint-$$
JOURNAL=$(mktemp -d)
KIDS=""

cleanup() {
    tmux -L "$SOCK" kill-server 2>/dev/null || true
    # shellcheck disable=SC2086 # a list of PIDs, ours
    [ -n "$KIDS" ] && kill $KIDS 2>/dev/null || true
    rm -rf "$JOURNAL"
}
trap cleanup EXIT INT TERM

echo "top footprint: $PROCS live processes (each touching a fresh page every second), immp top at 1 Hz for $SECS s"
i=0
while [ "$i" -lt "$PROCS" ]; do
    "$WL" idle </dev/null >/dev/null &
    KIDS="$KIDS $!"
    i=$((i + 1))
done
sleep 2

tmux -L "$SOCK" new-session -d -x 160 -y 50 \
    "$IMMP top --bandwidth 100Mbit --interval 1s --journal-dir $JOURNAL"
shell=$(tmux -L "$SOCK" display-message -p '#{pane_pid}')
pid=""
for _ in $(seq 50); do
    pid=$(cat "/proc/$shell/task/$shell/children" 2>/dev/null | tr ' ' '\n' | head -n1)
    [ -z "$pid" ] && pid=$shell # the pane runs immp directly when the shell execs it
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = immp ] && break
    sleep 0.1
done
# Start measuring after load and attach (one-off costs) and a few intervals.
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
t0=$(date +%s.%N)
c0=$(ticks "$pid")
sleep "$SECS"
c1=$(ticks "$pid")
t1=$(date +%s.%N)
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
rows=$(tmux -L "$SOCK" capture-pane -p | grep -o '[0-9]* of [0-9]*' | head -n1)
tps=$(getconf CLK_TCK)
tmux -L "$SOCK" send-keys q
awk -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v tps="$tps" -v rss="$rss" -v hwm="$hwm" -v rows="$rows" 'BEGIN {
    cpu = (c1 - c0) / tps / (t1 - t0) * 100
    printf "  table: %s processes shown\n", rows
    printf "  immp top CPU: %.2f %% of one core (goal < 2 %%)\n", cpu
    printf "  immp top RSS: %.1f MB steady (goal < 40 MB); peak %.1f MB\n", rss / 1024, hwm / 1024
    printf "  ratio: %.3f of the CPU goal, %.3f of the RSS goal\n", cpu / 2, rss / 1024 / 40
}'
