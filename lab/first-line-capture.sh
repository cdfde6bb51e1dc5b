#!/usr/bin/env bash
# One first-line run of punchline in a running lab, captured: tcpdump on the
# hosts' and the internet's interfaces, each side's stderr (RUST_LOG debug)
# and stdout stamped with the wall clock, the rendezvous' log. For the
# millisecond account in bench/first-line-timeline.md.
#
# Usage (as root, from the workspace, with a lab kept by `lab up`):
#   target/release/lab up --a home --b home --overlapping-lans \
#       --delay-a 5 --delay-b 40 --delay-rv 20 &
#   lab/first-line-capture.sh PREFIX OUTDIR [RUNS] [punchline|raw]
# PREFIX is the lab's namespace prefix as `lab up` prints it (pl-1234-0).
# Runs 0..=RUNS (run 0 is a warm-up, captured like the others). `raw` runs the
# bench's baseline (`rawpunch`) instead. Every run uses fresh ports (30000 + 2n
# for punchline, as the bench; 31000 + 2n for the baseline) and its own code.
set -euo pipefail

prefix=$1
out=$2
runs=${3:-3}
program=${4:-punchline}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
rv_addr=203.0.113.10
mkdir -p "$out"

# Prefixes every line of stdin with the wall clock (bash builtin, no fork).
stamp() { while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }

pids=()
finish() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap finish EXIT

# The rendezvous, as the bench configures it (real defaults, rate limits out of
# the way of back-to-back runs).
if [ "$program" = raw ]; then
    ip netns exec "$prefix-rv" "$bin/rawpunch" serve --listen "$rv_addr:7445" \
        2> >(stamp > "$out/rendezvous.log") &
    base=31000
else
    ip netns exec "$prefix-rv" env RUST_LOG=punchline_rendezvous=debug \
        "$bin/rendezvous" --listen "$rv_addr:7425" \
        --connections-per-minute 1000000 --codes-per-minute 1000000 \
        2> >(stamp > "$out/rendezvous.log") &
    base=30000
fi
pids+=($!)
sleep 0.5

for run in $(seq 0 "$runs"); do
    dir=$out/run$run
    mkdir -p "$dir"
    caps=()
    for spec in a:eth0 b:eth0 rv:eth0 inet:side-a inet:side-b inet:side-rv; do
        ns=${spec%%:*}
        dev=${spec#*:}
        ip netns exec "$prefix-$ns" tcpdump -i "$dev" -n -U --immediate-mode \
            --time-stamp-precision=micro -w "$dir/$ns-$dev.pcap" tcp 2>/dev/null &
        caps+=($!)
    done
    sleep 1
    port_a=$((base + 2 * run))
    port_b=$((port_a + 1))
    code="$((run + 1))-first-line"
    # One side: stamp its start (the bench's "just before spawn"), then run
    # it in its namespace with one line on a stdin kept open, as the bench does.
    side() { # host name port
        local host=$1 name=$2 port=$3
        {
            printf '%s start\n' "$EPOCHREALTIME" > "$dir/$name.start"
            if [ "$program" = raw ]; then
                exec ip netns exec "$prefix-$host" "$bin/rawpunch" connect \
                    --server "$rv_addr:7445" --port "$port" --name "run$run" \
                    --timeout 10 "first line from $name"
            fi
            exec ip netns exec "$prefix-$host" env RUST_LOG=punchline_peer=debug,punchline_rendezvous=info \
                "$bin/peer" --server "$rv_addr:7425" --port "$port" --name "$name" \
                --punch-timeout 10 "$code"
        } < <(printf 'first line from %s\n' "$name"; sleep 6) \
          > >(stamp > "$dir/$name.stdout") 2> >(stamp > "$dir/$name.stderr")
    }
    side a alice "$port_a" &
    pa=$!
    side b bob "$port_b" &
    pb=$!
    sleep 5
    kill "$pa" "$pb" 2>/dev/null || true
    wait "$pa" "$pb" 2>/dev/null || true
    sleep 0.5
    kill "${caps[@]}" 2>/dev/null || true
    wait "${caps[@]}" 2>/dev/null || true
    echo "run $run done: $dir"
done
