# common.sh - sourced by local_slurm.sh (one node) and two_node_slurm.sh (two nodes): process helpers and
# the part of slurm.conf both clusters share. The sourcing script defines log() and die() first.

# pid_alive PIDFILE COMM: the PID in PIDFILE lives, is not a zombie, and its comm starts with COMM
# (guards against stale files and PID reuse; a daemon killed with SIGKILL stays a zombie until init reaps it).
pid_alive() {
  local f="$1" comm="$2" pid
  [ -s "$f" ] || return 1
  pid="$({ tr -dc 0-9 < "$f"; } 2>/dev/null || true)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 1
  case "$(cat "/proc/$pid/comm")" in "$comm"*) return 0 ;; esac
  return 1
}

# stop_pidfile PIDFILE COMM: SIGTERM, wait up to 10 s, SIGKILL. Only that PID.
stop_pidfile() {
  local f="$1" comm="$2" pid i
  pid_alive "$f" "$comm" || { rm -f "$f"; return 0; }
  pid="$({ tr -dc 0-9 < "$f"; } 2>/dev/null || true)"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do pid_alive "$f" "$comm" || break; sleep 0.1; done
  if pid_alive "$f" "$comm"; then log "$comm ($pid) did not exit, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$f"; log "stopped $comm (pid $pid)"
}

wait_for() {  # wait_for SECONDS CMD...: retry CMD every 0.2 s
  local n=$(( $1 * 5 )) i; shift
  for i in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

# hardware KEY: KEY's value (CPUs, RealMemory, ...) in `slurmd -C`, what this machine offers a node.
hardware() { slurmd -C | head -1 | sed -n "s/.* $1=\([0-9]*\).*/\1/p"; }

# replace_conf NEW FILE: move NEW over FILE; CONF_CHANGED=1 if that changed FILE (most settings need the
# daemons restarted), else 0.
replace_conf() {
  CONF_CHANGED=0
  cmp -s "$1" "$2" 2>/dev/null || CONF_CHANGED=1
  mv "$1" "$2"; chmod 644 "$2"
  if [ "$CONF_CHANGED" = 1 ]; then log "wrote $2"; else log "$2 unchanged"; fi
}

# slurm_conf_common: the slurm.conf settings of both clusters (each adds its names, ports, files and nodes).
slurm_conf_common() {
  cat <<'EOF'
# root everywhere: CI runs as root; no slurm user/permissions to set up
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups (containers/CI often lack a writable cgroup tree): plain process
# tracking by parent PID, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# schedule quickly (tests wait on it)
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# a node that was DOWN (e.g. a killed slurmd) comes back when its slurmd registers
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
EOF
}
