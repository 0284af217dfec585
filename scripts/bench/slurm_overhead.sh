#!/usr/bin/env bash
# The cost of running a stage as a Slurm job instead of locally, per stage, on this machine's
# cluster (scripts/slurm/up.sh): a chain of N trivial `command` stages (each waits for the
# previous one, so nothing overlaps) run locally, then with `executor: slurm` at two polling
# intervals; the peer is Slurm's own round trip for the same N commands (`sbatch --wait`, one
# after the other), and, as the floor, the same jobs watched with `squeue` every 100ms. Prints
# seconds per stage and the ratio to the peer.
#
#   scripts/bench/slurm_overhead.sh [BINARY] [N]
set -euo pipefail
bin=$(realpath "${1:-target/release/cusa-pipe}")
n=${2:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

write() { # $1: executor line
  {
    echo "version: 1"
    echo "$1"
    echo "stages:"
    for i in $(seq 1 "$n"); do
      echo "  s$i:"
      echo "    kind: command"
      echo "    with:"
      if [ "$i" = 1 ]; then
        echo "      run: echo 1 > \${out}/n.txt"
      else
        echo "      run: cat \${s$((i - 1))}/n.txt > \${out}/n.txt; echo $i >> \${out}/n.txt"
      fi
    done
  } > pipeline.yaml
}

secs() { # runs "$@", prints the wall seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > /dev/null 2>&1
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }' 
}

write "executor: local"
local_s=$(secs "$bin" --cache-dir c-local run)
write "executor: {kind: slurm, poll_interval: 200ms, poll_max: 1s}"
fast_s=$(secs "$bin" --cache-dir c-fast run)
write "executor: {kind: slurm}"
default_s=$(secs "$bin" --cache-dir c-default run)
peer() { for _ in $(seq 1 "$n"); do sbatch --wait --quiet --output=/dev/null --wrap true; done; }
peer_s=$(secs peer)
floor() {
  for _ in $(seq 1 "$n"); do
    local j
    j=$(sbatch --parsable --output=/dev/null --wrap true)
    until squeue --jobs="$j" --states=all --noheader -O "State:|" | grep -q COMPLETED; do
      sleep 0.1
    done
  done
}
floor_s=$(secs floor)

per() { awk -v a="$1" -v n="$n" 'BEGIN { print a / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { print a / b }'; }
printf '%-44s %8s %10s\n' "chain of $n stages" "s/stage" "vs peer"
printf '%-44s %8.3f %10s\n' "local" "$(per "$local_s")" "-"
printf '%-44s %8.3f %9.2fx\n' "slurm, poll 200ms..1s" "$(per "$fast_s")" "$(ratio "$fast_s" "$peer_s")"
printf '%-44s %8.3f %9.2fx\n' "slurm, default poll 5s..60s" "$(per "$default_s")" "$(ratio "$default_s" "$peer_s")"
printf '%-44s %8.3f %10s\n' "peer: sbatch --wait --wrap true (sequential)" "$(per "$peer_s")" "1.00x"
printf '%-44s %8.3f %9.2fx\n' "floor: sbatch + squeue every 100ms" "$(per "$floor_s")" "$(ratio "$floor_s" "$peer_s")"
