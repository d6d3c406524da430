#!/usr/bin/env bash
# The long run of tests/properties.rs: rounds of
#   PROPTEST_CASES=CASES PROPTEST_RNG_SEED=<fresh seed> cargo test --release --test properties
# until MINUTES have passed (the round under way is finished, so it may overrun by one
# round). Prints the cases each round ran and the total; stops at the first failure and
# prints the shrunk input and the command that replays it.
#
#   benches/fuzz.sh [MINUTES (10)] [CASES per property per round (20000)]
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-10}
cases=${2:-20000}
cargo test --release --locked --test properties --no-run --quiet

log=$(mktemp)
trap 'rm -f "$log"' EXIT
deadline=$(($(date +%s) + minutes * 60))
rounds=0
total=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    rounds=$((rounds + 1))
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    started=$(date +%s)
    if PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed \
        cargo test --release --locked --test properties -- --nocapture >"$log" 2>&1; then
        # Each property prints `property "NAME": N cases passed in T`.
        ran=$(grep -oE '[0-9]+ cases passed' "$log" | awk '{ n += $1 } END { print n + 0 }')
        total=$((total + ran))
        echo "round $rounds (seed $seed): $ran cases passed in $(($(date +%s) - started)) s"
    else
        echo "round $rounds (seed $seed): FAILED"
        sed -n '/^failures:$/,/^test result/p' "$log"
        echo "replay: PROPTEST_CASES=$cases PROPTEST_RNG_SEED=$seed cargo test --release --test properties"
        echo "before the failure: $total cases passed in $((rounds - 1)) rounds"
        exit 1
    fi
done
echo "total: $total cases passed in $rounds rounds ($minutes min), no failure"
