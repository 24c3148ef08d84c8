#!/usr/bin/env bash
# The `slurm` tests on real clusters (`make test-slurm`, .ci/run): start the single-node cluster
# (local_slurm.sh: tests/test_slurm.py) and the two-node one (two_node_slurm.sh:
# tests/test_slurm_two_node.py), run `pytest -m slurm` with SGEXP_REQUIRE_SLURM=1 (a cluster that is not
# up fails the tests instead of skipping them), and stop both clusters on exit: also when a test fails,
# a cluster does not start, or on Ctrl-C/SIGTERM. Both run at once; they share nothing (ports, munge,
# config, state).
#
#   scripts/slurm/test_slurm.sh [pytest arguments, e.g. -k two_node]    (root, or sudo for the clusters)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

stop_clusters() {
  $SUDO scripts/slurm/two_node_slurm.sh stop || true
  $SUDO scripts/slurm/local_slurm.sh stop || true
}
trap stop_clusters EXIT
trap 'exit 130' INT   # bash runs the EXIT trap on `exit`, not on a signal it dies of
trap 'exit 143' TERM

t0=$SECONDS
$SUDO scripts/slurm/local_slurm.sh start >/dev/null
$SUDO scripts/slurm/two_node_slurm.sh start >/dev/null
echo "test_slurm.sh: both clusters up in $(( SECONDS - t0 )) s"
SGEXP_REQUIRE_SLURM=1 "$PY" -m pytest -q -m slurm "$@"
