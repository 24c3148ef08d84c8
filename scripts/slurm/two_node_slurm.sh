#!/usr/bin/env bash
# two_node_slurm.sh - a real multi-node (default 2) SLURM cluster on one machine, for sgexp's
# two-node tests (tests/test_slurm_two_node.py; `make test-slurm`, .ci/run). Debian 12, SLURM 22.05
# (Debian packages), run as root.
#
# Provenance: adapted from the proven recipe ../shared/notes/slurm/two_node_slurm.sh (notes:
# ../shared/notes/two-node-slurm.md: what was tried, what was seen working, the pitfalls). Changes
# here: partition `sgexp`, `selftest` checks the nodes only (the DDP job is tests/test_slurm_two_node.py),
# `env` prints the client setting; the process helpers and the slurm.conf settings it shares with
# local_slurm.sh are in common.sh, package installation in ../apt_install.sh.
#
#   two_node_slurm.sh start     install if missing, configure, start munged +
#                               slurmctld + one slurmd per node, wait until all
#                               nodes are idle and a 2-node step really runs
#   two_node_slurm.sh stop      cancel our jobs, stop our daemons by PID, kill any
#                               leftover process inside our node namespaces
#   two_node_slurm.sh status    our daemons + sinfo
#   two_node_slurm.sh clean     stop, then delete the whole directory
#   two_node_slurm.sh selftest  srun across the nodes: hostname, node id per task
#   two_node_slurm.sh env       the line that points SLURM clients at this cluster
#
# It runs next to scripts/slurm/local_slurm.sh's single-node cluster without sharing anything.
# Clients must use our config:  source "$TWO_NODE_SLURM_DIR/env.sh"
#                               (= export SLURM_CONF=$TWO_NODE_SLURM_DIR/etc/slurm.conf)
#
# Isolation: this cluster shares nothing with a default SLURM/munge on the same
# machine (/etc/slurm, ports 6817/6818, /run/munge): its own config dir, ports,
# munged (own socket + key), state/spool/log/pid files, all under one directory.
# Only loopback addresses are used. Nothing outside the directory is written,
# except /etc/hosts lines in the no-namespace fallback (removed by stop).
#
# How the nodes are made: each slurmd runs as `slurmd -N <node>` (Debian's build
# accepts several slurmds on one host as long as each node has its own
# NodeHostname and Port) inside its OWN UTS + mount namespace (unshare):
#   - UTS: `hostname` in a job prints the node name (sg-node1, sg-node2), as on a
#     real cluster (gloo, Lightning, logs see distinct hosts);
#   - mount: a private /etc/hosts (bind mount) in which the node names resolve to
#     their own loopback addresses, so MASTER_ADDR=<first node of
#     SLURM_JOB_NODELIST> (what Lightning's SLURMEnvironment does) resolves
#     inside jobs, without touching the machine's /etc/hosts.
# Every job step (slurmstepd and the tasks) is forked by its slurmd and so lives
# in that node's namespaces; `stop` uses that to find leftovers precisely.
#
# Knobs (environment, all optional):
#   TWO_NODE_SLURM_DIR=/tmp/sgexp-2node   everything lives here
#   TWO_NODE_SLURM_NODES=2                number of nodes
#   TWO_NODE_SLURM_NODE_PREFIX=sg-node    node names: sg-node1 .. sg-nodeN
#   TWO_NODE_SLURM_CTL_NAME=sg-ctl        hostname given to slurmctld (its UTS ns)
#   TWO_NODE_SLURM_ADDR_PREFIX=127.0.2    node i gets address 127.0.2.i (loopback)
#   TWO_NODE_SLURM_PORT=7817              SlurmctldPort; node i listens on PORT+i
#   TWO_NODE_SLURM_CPUS=<detected>        CPUs advertised by EACH node (they share
#                                         the machine's cores); more than the real
#                                         count adds SlurmdParameters=config_overrides
#   TWO_NODE_SLURM_PARTITION=sgexp
#   TWO_NODE_SLURM_CRED_EXPIRE=10         a requeued job waits this +1 s (default 120)
#   TWO_NODE_SLURM_WAIT=60                seconds to wait for the nodes
#   TWO_NODE_SLURM_NS=auto                1: require namespaces; 0: no namespaces
#                                         (then node names are added to /etc/hosts
#                                         and `hostname` is the machine's in jobs);
#                                         auto: namespaces if `unshare` works
#   TWO_NODE_SLURM_INSTALL=1              apt-get install the packages if missing (0: never)
set -euo pipefail

ACTION="${1:-start}"
DIR="${TWO_NODE_SLURM_DIR:-/tmp/sgexp-2node}"
NNODES="${TWO_NODE_SLURM_NODES:-2}"
PREFIX="${TWO_NODE_SLURM_NODE_PREFIX:-sg-node}"
CTL_NAME="${TWO_NODE_SLURM_CTL_NAME:-sg-ctl}"
ADDR_PREFIX="${TWO_NODE_SLURM_ADDR_PREFIX:-127.0.2}"
PORT="${TWO_NODE_SLURM_PORT:-7817}"
PARTITION="${TWO_NODE_SLURM_PARTITION:-sgexp}"
CRED_EXPIRE="${TWO_NODE_SLURM_CRED_EXPIRE:-10}"
WAIT_S="${TWO_NODE_SLURM_WAIT:-60}"
NS_MODE="${TWO_NODE_SLURM_NS:-auto}"
DO_INSTALL="${TWO_NODE_SLURM_INSTALL:-1}"

CONF="$DIR/etc/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket.2"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$DIR/run/slurmctld.pid"
HOSTS_TAG="# two_node_slurm:$DIR"      # marks /etc/hosts lines of the fallback mode
export SLURM_CONF="$CONF"             # every client and daemon below uses OUR config

log() { echo "[two_node_slurm $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
case "$DIR" in /|/tmp|/tmp/|/etc*|/usr*|/var|/root|"") die "refusing TWO_NODE_SLURM_DIR=$DIR";; esac
[ "$NNODES" -ge 1 ] 2>/dev/null || die "TWO_NODE_SLURM_NODES must be a number"

node_name() { echo "${PREFIX}$1"; }
node_addr() { echo "${ADDR_PREFIX}.$1"; }
node_port() { echo $(( PORT + $1 )); }
node_pidfile() { echo "$DIR/run/slurmd-$(node_name "$1").pid"; }   # = SlurmdPidFile with %n
node_nsfile() { echo "$DIR/run/$(node_name "$1").ns"; }

# --- process helpers ----------------------------------------------------------
. "$(dirname "$(readlink -f "$0")")/common.sh"   # pid_alive, stop_pidfile, wait_for, slurm_conf_common
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
port_busy() {  # is something (not necessarily ours) listening on TCP port $1?
  command -v ss >/dev/null || return 1
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}
use_ns() {     # decide once whether slurmds get their own UTS + mount namespaces
  if [ -z "${_USE_NS:-}" ]; then
    case "$NS_MODE" in
      1) unshare --uts --mount true 2>/dev/null || die "TWO_NODE_SLURM_NS=1 but unshare --uts --mount fails"; _USE_NS=1 ;;
      0) _USE_NS=0 ;;
      *) if unshare --uts --mount true 2>/dev/null; then _USE_NS=1; else _USE_NS=0; log "unshare not permitted: no namespaces (node names go to /etc/hosts)"; fi ;;
    esac
  fi
  [ "$_USE_NS" = 1 ]
}

# --- install --------------------------------------------------------------------
install_packages() {
  [ "$DO_INSTALL" = 1 ] || return 0
  "$(dirname "$(readlink -f "$0")")/../apt_install.sh" slurmctld slurmd slurm-client munge
}

# --- munge (our own daemon, socket and key) ----------------------------------
start_munge() {
  # munged insists: socket dir 0755 (others need x to reach the socket), key
  # owned by the daemon's user and not readable by others. It runs as the
  # 'munge' user created by the package, like the stock service.
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    else dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none; fi
  fi
  chown munge:munge "$MUNGE_DIR/munge.key"; chmod 0400 "$MUNGE_DIR/munge.key"
  if pid_alive "$MUNGE_PID" munged && munge_ok; then log "munged already running (pid $(cat "$MUNGE_PID"))"; return 0; fi
  stop_pidfile "$MUNGE_PID" munged
  # --force: take over a stale socket left by a killed munged of OURS (the path is ours)
  runuser -u munge -- munged --force --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_PID" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  wait_for 10 munge_ok || die "munge self-test failed (see $MUNGE_DIR/munged.log)"
  log "munged started (pid $(cat "$MUNGE_PID"), socket $MUNGE_SOCK)"
}

# --- slurm.conf -------------------------------------------------------------
write_conf() {
  local cpus mem overrides="" ctl_host nodes_expr i n
  cpus="$(hardware CPUs)"; mem="$(hardware RealMemory)"
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not parse 'slurmd -C': $(slurmd -C | head -1)"
  if [ -n "${TWO_NODE_SLURM_CPUS:-}" ] && [ "$TWO_NODE_SLURM_CPUS" != "$cpus" ]; then
    cpus="$TWO_NODE_SLURM_CPUS"
    overrides="SlurmdParameters=config_overrides"   # believe slurm.conf, not the hardware
  fi
  mem=$(( mem / NNODES ))    # RealMemory may be below the real amount, never above
  # slurmctld only starts if its hostname is one of SlurmctldHost's names: with
  # namespaces it gets its own hostname; without, use the machine's. The address
  # in () is what clients and slurmds use, so the name needs no resolving.
  if use_ns; then ctl_host="$CTL_NAME"; else ctl_host="$(hostname -s)"; fi
  nodes_expr="${PREFIX}[1-${NNODES}]"; [ "$NNODES" = 1 ] && nodes_expr="${PREFIX}1"
  install -d -m 0755 "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  {
    cat <<EOF
# Generated by two_node_slurm.sh: $NNODES slurmd nodes on one machine, loopback only.
ClusterName=sg2node
SlurmctldHost=${ctl_host}(127.0.0.1)
# our own munged: the default socket (/run/munge) may belong to another cluster.
# cred_expire also sets how long a requeued job waits before it may start again.
AuthInfo=socket=${MUNGE_SOCK},cred_expire=${CRED_EXPIRE}
# our own ports (a default cluster uses 6817/6818); each node overrides
# SlurmdPort with Port= below, because all slurmds bind 0.0.0.0 in one net ns
SlurmctldPort=${PORT}
SlurmdPort=$(node_port 1)
# per-node files: %n = node name, so the slurmds never share a spool/pid/log
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
# no accounting daemon (sacct is unavailable; squeue/scontrol work)
AccountingStorageType=accounting_storage/none
${overrides}
EOF
    slurm_conf_common
    for i in $(seq 1 "$NNODES"); do
      n="$(node_name "$i")"
      # NodeHostname distinct per node: SLURM refuses two nodes with the same
      # NodeHostname unless built with --enable-multiple-slurmd.
      echo "NodeName=$n NodeHostname=$n NodeAddr=$(node_addr "$i") Port=$(node_port "$i") CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    done
    echo "PartitionName=${PARTITION} Nodes=${nodes_expr} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF.new"
  replace_conf "$CONF.new" "$CONF"
  echo "export SLURM_CONF=$CONF" > "$DIR/env.sh"
  # hosts file seen by the node namespaces: the machine's, plus our node names
  { grep -v "$HOSTS_TAG" /etc/hosts || true
    for i in $(seq 1 "$NNODES"); do echo "$(node_addr "$i") $(node_name "$i")"; done; } > "$DIR/etc/hosts"
}

hosts_add() {   # fallback without namespaces: make node names resolve machine-wide
  local i n a
  for i in $(seq 1 "$NNODES"); do
    n="$(node_name "$i")"; a="$(node_addr "$i")"
    grep -q "^$a $n $HOSTS_TAG\$" /etc/hosts || { echo "$a $n $HOSTS_TAG" >> /etc/hosts; log "added '$a $n' to /etc/hosts"; }
  done
}
hosts_remove() {
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  # rewrite in place (keeps the inode: /etc/hosts may itself be a bind mount)
  local tmp; tmp="$(grep -vF "$HOSTS_TAG" /etc/hosts)"; printf '%s\n' "$tmp" > /etc/hosts
  log "removed our lines from /etc/hosts"
}

# --- daemons -----------------------------------------------------------------
start_ctld() {
  if pid_alive "$CTLD_PID" slurmctld && ctld_up; then log "slurmctld already running (pid $(cat "$CTLD_PID"))"; return 0; fi
  stop_pidfile "$CTLD_PID" slurmctld
  port_busy "$PORT" && die "port $PORT is in use by another process (not ours): set TWO_NODE_SLURM_PORT"
  if use_ns; then
    unshare --uts sh -c 'hostname "$1" && exec slurmctld -f "$2"' sh "$CTL_NAME" "$CONF"
  else
    slurmctld -f "$CONF"
  fi
  wait_for 30 ctld_up || { tail -n 20 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not answer 'scontrol ping'"; }
  log "slurmctld started (pid $(cat "$CTLD_PID"), port $PORT)"
}

start_node() {
  local i="$1" n pidf p
  n="$(node_name "$i")"; pidf="$(node_pidfile "$i")"
  if pid_alive "$pidf" slurmd; then log "slurmd $n already running (pid $(cat "$pidf"))"; return 0; fi
  rm -f "$pidf"
  port_busy "$(node_port "$i")" && die "port $(node_port "$i") is in use by another process (not ours)"
  install -d -m 0755 "$DIR/spool/$n"
  if use_ns; then
    # own hostname (UTS) + own /etc/hosts (private mount ns; unshare makes the
    # propagation private, so the bind mount is invisible outside). slurmd
    # daemonizes; the namespaces live as long as it or any job step in them.
    unshare --uts --mount sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
      sh "$n" "$DIR/etc/hosts" "$CONF"
  else
    slurmd -f "$CONF" -N "$n"
  fi
  wait_for 20 pid_alive "$pidf" slurmd || { tail -n 20 "$DIR/log/slurmd-$n.log" >&2; die "slurmd $n did not start"; }
  p="$(tr -dc 0-9 < "$pidf")"
  if use_ns; then
    # remember the namespace inode: `stop` kills what is left in it, and only that
    readlink "/proc/$p/ns/mnt" > "$(node_nsfile "$i")"
    log "slurmd $n started (pid $p, $(node_addr "$i"):$(node_port "$i"), hostname $n, $(cat "$(node_nsfile "$i")"))"
  else
    log "slurmd $n started (pid $p, $(node_addr "$i"):$(node_port "$i"), no namespaces)"
  fi
}

wait_ready() {
  local t0=$SECONDS out states
  while [ $(( SECONDS - t0 )) -lt "$WAIT_S" ]; do
    states="$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | sort -u || true)"
    # put back nodes left DOWN/DRAIN by an earlier, killed run (ours: our ctld)
    echo "$states" | awk '$2 ~ /down|drain|fail/ {print $1}' | while read -r n; do
      scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
    if [ "$(echo "$states" | awk '$2 == "idle"' | wc -l)" = "$NNODES" ]; then
      # sinfo may show state recovered from disk: prove a step runs on every node
      if out="$(timeout 20 srun -p "$PARTITION" -N "$NNODES" -n "$NNODES" --ntasks-per-node=1 -t 1 \
                 -J two_node_smoke printenv SLURMD_NODENAME 2>/dev/null)" \
         && [ "$(echo "$out" | sort -u | wc -l)" = "$NNODES" ]; then
        log "all $NNODES nodes idle; smoke step ran on: $(echo $out | tr '\n' ' ')"; return 0
      fi
    elif [ "$(echo "$states" | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | wc -l)" = "$NNODES" ]; then
      # a node brought back under a waiting (requeued) job: the job takes it at once, it never shows
      # idle; running jobs on it prove it answers (no '*')
      log "all $NNODES nodes up, busy with jobs: $(echo $states)"; return 0
    fi
    sleep 0.5
  done
  log "nodes not ready within ${WAIT_S}s: $(echo $states)"
  tail -n 15 "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log >&2 || true
  return 1
}

do_start() {
  local t0=$SECONDS i any=0
  install_packages
  # fresh cluster unless ours is already running: no stale jobs/state/sockets
  if ! pid_alive "$CTLD_PID" slurmctld; then
    for i in $(seq 1 "$NNODES"); do pid_alive "$(node_pidfile "$i")" slurmd && any=1; done
    if [ "$any" = 0 ]; then
      sweep_namespaces
      rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
    fi
  fi
  start_munge
  write_conf
  if [ "$CONF_CHANGED" = 1 ]; then   # most settings need a daemon restart
    for i in $(seq 1 "$NNODES"); do stop_pidfile "$(node_pidfile "$i")" slurmd; done
    stop_pidfile "$CTLD_PID" slurmctld
  fi
  use_ns || hosts_add
  start_ctld
  for i in $(seq 1 "$NNODES"); do start_node "$i"; done
  wait_ready || die "cluster not ready"
  log "cluster ready in $(( SECONDS - t0 ))s"
  sinfo -N -o '%N %T %o:%P %c' >&2
  echo "export SLURM_CONF=$CONF"
}

# kill what is left inside our node namespaces (slurmstepd + tasks of jobs that
# outlived slurmd); the recorded inode is never the machine's own namespace.
sweep_namespaces() {
  local i f ns p sig killed
  for i in $(seq 1 "$NNODES"); do
    f="$(node_nsfile "$i")"; [ -s "$f" ] || continue
    ns="$(cat "$f")"
    if [ "$ns" = "$(readlink /proc/1/ns/mnt)" ] || [ "$ns" = "$(readlink /proc/self/ns/mnt)" ]; then rm -f "$f"; continue; fi
    for sig in TERM KILL; do
      killed=0
      for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
        # zombies are dead already (PID 1 reaps them); signalling them is useless
        [ "$(sed 's/^.*) //' "$p/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || continue
        kill -s "$sig" "${p#/proc/}" 2>/dev/null && killed=$(( killed + 1 ))
      done
      [ "$killed" = 0 ] && break
      log "sent SIG$sig to $killed leftover process(es) in $(node_name "$i")'s namespace"
      sleep 1
    done
    rm -f "$f"
  done
}

do_stop() {
  local i jobs
  if pid_alive "$CTLD_PID" slurmctld && ctld_up; then
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// }" ]; then
      log "cancelling our jobs: $jobs"; scancel $jobs 2>/dev/null || true
      for i in $(seq 1 75); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    scontrol shutdown >/dev/null 2>&1 || true      # our ctld + our slurmds only
    for i in $(seq 1 100); do
      local alive=0 j
      pid_alive "$CTLD_PID" slurmctld && alive=1
      for j in $(seq 1 "$NNODES"); do pid_alive "$(node_pidfile "$j")" slurmd && alive=1; done
      [ "$alive" = 0 ] && break; sleep 0.1
    done
  fi
  for i in $(seq 1 "$NNODES"); do stop_pidfile "$(node_pidfile "$i")" slurmd; done
  stop_pidfile "$CTLD_PID" slurmctld
  sweep_namespaces
  stop_pidfile "$MUNGE_PID" munged
  hosts_remove
  log "stopped (files kept in $DIR; '$0 clean' removes them)"
}

do_status() {
  local i rc=0
  if pid_alive "$MUNGE_PID" munged; then echo "munged: running (pid $(cat "$MUNGE_PID"))"; else echo "munged: not running"; rc=1; fi
  if pid_alive "$CTLD_PID" slurmctld; then echo "slurmctld: running (pid $(cat "$CTLD_PID"))"; else echo "slurmctld: not running"; rc=1; fi
  for i in $(seq 1 "$NNODES"); do
    if pid_alive "$(node_pidfile "$i")" slurmd; then echo "slurmd $(node_name "$i"): running (pid $(cat "$(node_pidfile "$i")"))"
    else echo "slurmd $(node_name "$i"): not running"; rc=1; fi
  done
  [ -f "$CONF" ] && sinfo -N -o '%N %T %o:%P %c' 2>/dev/null || true
  return $rc
}

do_selftest() {
  local out
  out="$(timeout 30 srun -N "$NNODES" -n "$NNODES" --ntasks-per-node=1 -t 1 \
    bash -c 'echo "hostname=$(hostname) SLURMD_NODENAME=$SLURMD_NODENAME SLURM_NODEID=$SLURM_NODEID SLURM_PROCID=$SLURM_PROCID"' | sort)"
  echo "$out"
  [ "$(echo "$out" | grep -c SLURM_NODEID)" = "$NNODES" ]
}

case "$ACTION" in
  start)    do_start ;;
  stop)     do_stop ;;
  status)   do_status ;;
  clean)    do_stop; rm -rf "$DIR"; log "removed $DIR" ;;
  selftest) do_selftest ;;
  env)      echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 [start|stop|status|clean|selftest|env]" >&2; exit 2 ;;
esac
