#!/usr/bin/env bash
# Time the README's test command on a fresh clone, install included, as CI runs it.
# Writes benchmarks/results/fresh_clone_test.txt. Run from the repository root: bash benchmarks/fresh_clone_test.sh
set -euo pipefail
root=$(pwd)
work=$(mktemp -d)
git clone -q "$root" "$work/clone"
cd "$work/clone"
start=$(date +%s)
status=0
REARCH_CACHE_DIR="$work/cache" make test > "$work/log" 2>&1 || status=$?
end=$(date +%s)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "machine: $(nproc) CPU cores, $(python3 --version)"
  echo "commit: $(git rev-parse --short HEAD)"
  echo "make test on a fresh clone with an empty cache, install included: $((end - start)) s (target 900 s), exit $status"
  tail -n 3 "$work/log"
} | tee "$root/benchmarks/results/fresh_clone_test.txt"
rm -rf "$work"
exit "$status"
