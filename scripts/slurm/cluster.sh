#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, with accounting, for tests and CI.
#
#   scripts/slurm/cluster.sh start  STATE_DIR   # install (apt) if missing, start, wait until idle
#   scripts/slurm/cluster.sh stop   STATE_DIR   # cancel jobs, stop every daemon by its pid file
#   scripts/slurm/cluster.sh status STATE_DIR   # which daemons run, and sinfo
#
# The Slurm commands (and Snakemake) then find it; SLURM_CONF=STATE_DIR/slurm.conf
# names it explicitly.
#
# What runs, as on a real cluster: munged (authentication), MariaDB and slurmdbd
# (accounting: the Snakemake plugin asks `sacct` for job states), slurmctld and
# one slurmd. The Debian packages' init scripts need systemd, so each daemon is
# started directly. Everything lives under STATE_DIR: configs, database,
# spool, logs, pid files and the munge socket; nothing listens beyond
# 127.0.0.1. One thing outside it: /etc/slurm/slurm.conf becomes a symlink to
# STATE_DIR/slurm.conf while the cluster runs, because the Snakemake job step
# drops SLURM_CONF from the environment of the `srun` it runs inside each job
# (so srun finds only the default path, as on a real cluster); an existing
# slurm.conf that is not such a symlink is never touched. `stop` stops exactly
# the daemons whose pid files are under STATE_DIR, checking each pid's command
# name first, and removes the symlink.
#
# Needs root (slurmd starts jobs as their user; apt-get installs the packages).
# Exit status of `start`: 0 running; 3 the packages are missing and apt cannot
# get them, or not root (a caller may skip); anything else is an error.
# Ports: REPRO_SLURM_PORT_BASE (default 16817) and the three above it.
# CPUs: REPRO_SLURM_CPUS, what the node offers (default: what `slurmd -C` finds).
# More than the machine has oversubscribes it, which suits a test of the job
# plumbing whose jobs mostly start Python and wait.
set -euo pipefail

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
ETC_CONF=/etc/slurm/slurm.conf
CLUSTER=repro
PARTITION=debug
PORT_BASE=${REPRO_SLURM_PORT_BASE:-16817}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
# Daemon -> its process name in /proc/PID/comm (checked before any kill).
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)
declare -A COMM=([slurmd]=slurmd [slurmctld]=slurmctld [slurmdbd]=slurmdbd
  [mariadb]=mariadbd [munged]=munged)

say() { echo "cluster.sh: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}
skip() {
  say "SKIP: $*"
  exit 3
}

usage() {
  echo "usage: $0 start|stop|status STATE_DIR" >&2
  exit 2
}

# ---------------------------------------------------------------- packages

have_binaries() {
  local bin
  for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmdbd /usr/sbin/munged \
    /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/sacctmgr /usr/bin/sbatch; do
    [[ -x $bin ]] || return 1
  done
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  say "installing ${PACKAGES[*]} (apt-get)"
  # Download first: a failure here means the packages cannot be reached (skip);
  # a failure of the install itself is a real error.
  if ! apt-get install -y -q --no-install-recommends --download-only "${PACKAGES[@]}" \
    >"$STATE/log/apt.log" 2>&1; then
    apt-get update -q >>"$STATE/log/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends --download-only "${PACKAGES[@]}" \
      >>"$STATE/log/apt.log" 2>&1 ||
      skip "apt cannot get ${PACKAGES[*]}: $(tail -n 3 "$STATE/log/apt.log" | tr '\n' ' ')"
  fi
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1 ||
    die "apt-get install failed; see $STATE/log/apt.log"
  have_binaries || die "installed ${PACKAGES[*]}, but a daemon binary is still missing"
}

# ---------------------------------------------------------------- helpers

pidfile() { echo "$STATE/run/$1.pid"; }

# The pid of a running daemon we started, or nothing.
live_pid() {
  local file pid comm
  file=$(pidfile "$1")
  [[ -s $file ]] || return 0
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 0
  comm=$(cat "/proc/$pid/comm")
  [[ $comm == "${COMM[$1]}" ]] && echo "$pid"
  return 0
}

node_idle() { [[ $(sinfo -h -o %T) == idle ]]; }

# True while PID runs (a zombie waiting for init to reap it has stopped).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [[ ${stat##*) } != Z* ]]
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local end=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || return 1
    sleep 0.5
  done
  say "$what is up"
}

# ---------------------------------------------------------------- start

# /etc/slurm/slurm.conf -> STATE/slurm.conf, unless a slurm.conf of someone else is there.
link_etc_conf() {
  if [[ -L $ETC_CONF ]]; then
    local target pid
    target=$(readlink "$ETC_CONF")
    pid=$(tr -dc '0-9' <"$(dirname "$target")/run/slurmctld.pid" 2>/dev/null || true)
    if [[ $target != "$STATE/slurm.conf" && -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == slurmctld ]]; then
      die "$ETC_CONF points to the running cluster of $(dirname "$target"): stop it first"
    fi
  elif [[ -e $ETC_CONF ]]; then
    die "$ETC_CONF exists (a real Slurm installation?): not touching it"
  fi
  install -d /etc/slurm
  ln -sfn "$STATE/slurm.conf" "$ETC_CONF"
}

write_configs() {
  # The node as slurmd sees it (CPUs, sockets, cores, memory), under a fixed name.
  local node memory overrides=""
  node=$(/usr/sbin/slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
  [[ $node == *CPUs=* ]] || die "slurmd -C did not describe this node: $node"
  if [[ -n ${REPRO_SLURM_CPUS:-} ]]; then
    [[ $REPRO_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] ||
      die "REPRO_SLURM_CPUS=$REPRO_SLURM_CPUS: expected a positive integer"
    memory=$(grep -o 'RealMemory=[0-9]*' <<<"$node")
    node="CPUs=$REPRO_SLURM_CPUS $memory"
    # slurmd reports the configured node, not the hardware it finds.
    overrides="SlurmdParameters=config_overrides"
  fi
  local auth="AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket"
  cat >"$STATE/slurm.conf" <<EOF
# Written by scripts/slurm/cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
$auth
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
$overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# With slurmdbd this "password" is the munge socket of the accounting connection.
AccountingStoragePass=$STATE/munge/munge.socket
NodeName=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd reads slurmdbd.conf beside slurm.conf; it must be private to SlurmUser.
  local password
  password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  (
    umask 077
    cat >"$STATE/slurmdbd.conf" <<EOF
$auth
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
  )
  echo "$password"
}

start_munge() {
  # munged insists that everyone may traverse its socket's directory (and its parents).
  install -d -m 0755 "$STATE/munge"
  /usr/sbin/mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null ||
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$STATE/munge/munge.key"
  /usr/sbin/munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$(pidfile munged)" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
  wait_for 20 munged test -S "$STATE/munge/munge.socket" ||
    die "munged did not start; see $STATE/log/munged.log"
}

start_mariadb() {
  local password=$1
  /usr/bin/mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" \
    --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
    die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
    --socket="$STATE/run/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$(pidfile mariadb)" --log-error="$STATE/log/mariadb.log" \
    </dev/null >/dev/null 2>&1 &
  local sql=(/usr/bin/mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -u root)
  wait_for 60 MariaDB "${sql[@]}" -e "SELECT 1" || die "MariaDB did not start; see $STATE/log/mariadb.log"
  "${sql[@]}" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    die "could not create the slurm database user"
}

# A start that fails half way stops what it started.
stop_after_failed_start() {
  local rc=$?
  ((rc == 0 || rc == 3)) || stop
  exit "$rc"
}

start() {
  [[ $(id -u) == 0 ]] || skip "a Slurm test cluster needs root (slurmd, apt-get)"
  if [[ -n $(live_pid slurmctld) ]]; then
    say "already running (SLURM_CONF=$STATE/slurm.conf)"
    return 0
  fi
  trap stop_after_failed_start EXIT
  # A fresh cluster every time: nothing of an earlier start in STATE_DIR is reused.
  rm -rf "${STATE:?}"/{log,run,ctld,spool,munge,mysql}
  install -d -m 0755 "$STATE" "$STATE/log" "$STATE/run" "$STATE/ctld" "$STATE/spool"
  chmod 0755 "$STATE"
  install_packages
  local port
  for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
    port_in_use "$port" &&
      die "port $port is in use (an earlier cluster not stopped? or set REPRO_SLURM_PORT_BASE)"
  done
  export SLURM_CONF=$STATE/slurm.conf
  local password
  password=$(write_configs)
  link_etc_conf
  start_munge
  start_mariadb "$password"
  /usr/sbin/slurmdbd
  wait_for 60 slurmdbd /usr/bin/sacctmgr -n list cluster ||
    die "slurmdbd does not answer; see $STATE/log/slurmdbd.log"
  /usr/bin/sacctmgr -i add cluster "$CLUSTER" >/dev/null
  /usr/sbin/slurmctld
  /usr/sbin/slurmd -N localhost
  wait_for 60 "the node" node_idle ||
    die "the node did not become idle: $(sinfo -h -o '%T %E' 2>&1); see $STATE/log/"
  trap - EXIT
  say "running: export SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------- stop

stop_daemon() {
  local name=$1 pid
  pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + 20))
    while running "$pid" && ((SECONDS < end)); do sleep 0.1; done
    if running "$pid"; then
      say "$name ($pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name ($pid)"
  fi
  rm -f "$(pidfile "$name")"
}

stop() {
  export SLURM_CONF=$STATE/slurm.conf
  if [[ -n $(live_pid slurmctld) ]]; then
    # Jobs first, so that no slurmstepd or job process outlives the cluster.
    local jobs
    jobs=$(timeout 20 squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086 # one job id per word
      timeout 20 scancel $jobs || true
      local end=$((SECONDS + 30))
      while [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null || true) ]] && ((SECONDS < end)); do
        sleep 0.5
      done
    fi
  fi
  local name
  for name in "${DAEMONS[@]}"; do stop_daemon "$name"; done
  if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$STATE/slurm.conf" ]]; then
    rm -f "$ETC_CONF"
  fi
}

status() {
  local name pid running=0
  for name in "${DAEMONS[@]}"; do
    pid=$(live_pid "$name")
    if [[ -n $pid ]]; then
      echo "$name: running ($pid)"
      running=1
    else
      echo "$name: stopped"
    fi
  done
  if [[ -n $(live_pid slurmctld) ]]; then
    SLURM_CONF=$STATE/slurm.conf sinfo
  fi
  ((running))
}

[[ $# == 2 ]] || usage
STATE=$(realpath -m "$2")
case $1 in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
