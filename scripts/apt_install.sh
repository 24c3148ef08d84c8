#!/usr/bin/env bash
# apt_install.sh PKG... - install those of the Debian packages PKG that are missing (root), without letting
# their maintainer scripts start the packages' default services: a container or CI machine has no systemd,
# and the services we need (SLURM daemons, the tests' PostgreSQL server) are started by our own scripts,
# with our own config, ports and data directories, never the stock ones (/etc/init.d would start slurmd
# without a slurm.conf, or a PostgreSQL cluster on port 5432).
# Used by scripts/slurm/local_slurm.sh, scripts/slurm/two_node_slurm.sh and .ci/run.
set -euo pipefail

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "[apt_install $(date +%T)] installing: ${missing[*]}" >&2
# invoke-rc.d asks policy-rc.d whether it may start a service; 101 = no. Only a policy-rc.d of ours is removed.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[apt_install $(date +%T)] installed: ${missing[*]}" >&2
