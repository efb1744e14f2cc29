#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the `slurm` tests and for trying the sweep as a cluster runs it.
#
#   scripts/slurm-local.sh install                 Debian's slurm-wlm and munge (+ slurmdbd, mariadb-server) via
#                                                  apt-get, when missing (root)
#   scripts/slurm-local.sh start [--accounting]    write the configuration under $SLURM_LOCAL_DIR and start munged,
#                                                  slurmctld, slurmd; --accounting adds mariadb and slurmdbd
#                                                  (sacct works), without it sacct answers "accounting disabled"
#   scripts/slurm-local.sh stop                    stop every daemon it started, by the PID it recorded
#   scripts/slurm-local.sh env                     the line to source: export SLURM_CONF=...
#
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/clipstudy-slurm): slurm.conf, logs, spool, state, PID files
# and the munge key and socket; nothing under /etc is changed, so clients need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf.
# Partitions: `debug` (default, no time limit) and `short` (MaxTime=1 minute, to see a job pend on its limit).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/clipstudy-slurm}
NODE=$(hostname -s)
DB_PORT=${SLURM_LOCAL_DB_PORT:-33061}

die() { echo "slurm-local: error: $*" >&2; exit 1; }
say() { echo "slurm-local: $*"; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root (apt-get install) or install them yourself"
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds, each try at most 10 s
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until timeout 10 "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up in time; see $DIR/log/"
        sleep 0.2
    done
}

write_slurm_conf() {
    local accounting=$1 cpus mem
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    cat >"$DIR/slurm.conf" <<EOF
# written by scripts/slurm-local.sh: one node, this machine
ClusterName=clipstudy
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/run/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0
EOF
    if [ "$accounting" = 1 ]; then
        cat >>"$DIR/slurm.conf" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStoragePass=$DIR/run/munge.socket
EOF
    else
        echo "AccountingStorageType=accounting_storage/none" >>"$DIR/slurm.conf"
    fi
    cat >>"$DIR/slurm.conf" <<EOF
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$NODE MaxTime=1 State=UP
EOF
}

start_munge() {
    if [ ! -f "$DIR/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$DIR/munge.key"
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/run/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munged.seed" \
        </dev/null >>"$DIR/log/daemons.out" 2>&1
    wait_for 10 munged munge --socket="$DIR/run/munge.socket" -n
}

start_database() {
    local data=$DIR/mysql
    if [ ! -d "$data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$data" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    fi
    mariadbd --user=root --datadir="$data" --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
        --innodb-buffer-pool-size=32M --skip-log-bin </dev/null >>"$DIR/log/daemons.out" 2>&1 &
    wait_for 60 mariadb mariadb --socket="$DIR/run/mysql.sock" -e "select 1"
    mariadb --socket="$DIR/run/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/run/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$DIR/slurmdbd.conf"
    SLURM_CONF=$DIR/slurm.conf slurmdbd </dev/null >>"$DIR/log/daemons.out" 2>&1
    wait_for 60 slurmdbd env SLURM_CONF="$DIR/slurm.conf" sacctmgr -n list cluster
    if ! SLURM_CONF=$DIR/slurm.conf sacctmgr -n -P list cluster format=cluster | grep -qx clipstudy; then
        SLURM_CONF=$DIR/slurm.conf sacctmgr -i add cluster clipstudy >/dev/null
    fi
}

start() {
    local accounting=0
    [ "${1:-}" = --accounting ] && accounting=1
    [ -f "$DIR/run/slurmctld.pid" ] && pid_alive "$DIR/run/slurmctld.pid" && die "already running in $DIR (stop first)"
    local ports=(6817 6818)
    [ "$accounting" = 1 ] && ports+=(6819 "$DB_PORT")
    for port in "${ports[@]}"; do  # another cluster (or a stale daemon) would answer instead
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is in use (another Slurm or database?): stop it first (scripts/slurm-local.sh stop)"
        fi
    done
    install_packages
    mkdir -p "$DIR"/{run,log,state,spool}
    chmod 0755 "$DIR" "$DIR/run"
    rm -rf "${DIR:?}"/state/* "${DIR:?}"/spool/*  # a fresh queue: job ids start at 1
    write_slurm_conf "$accounting"
    export SLURM_CONF=$DIR/slurm.conf
    start_munge
    [ "$accounting" = 1 ] && start_database
    slurmctld -i </dev/null >>"$DIR/log/daemons.out" 2>&1
    wait_for 30 slurmctld scontrol ping
    slurmd -N "$NODE" </dev/null >>"$DIR/log/daemons.out" 2>&1
    wait_for 30 "slurmd (node $NODE idle)" bash -c "sinfo -h -n $NODE -o %t | grep -qx idle"
    say "up ($([ "$accounting" = 1 ] && echo "with accounting" || echo "no accounting")): export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL
    local name=$1 file=$2 pid
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        sleep 0.2
    done
    say "$name ($pid) ignored SIGTERM for 30s: SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    [ -d "$DIR/run" ] || { say "nothing started in $DIR"; return 0; }
    if pid_alive "$DIR/run/slurmctld.pid"; then  # no job outlives its cluster
        SLURM_CONF=$DIR/slurm.conf scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
    stop_pid mariadb "$DIR/run/mariadb.pid"
    stop_pid munged "$DIR/run/munged.pid"
    say "stopped"
}

case "${1:-}" in
    install) install_packages ;;
    start) shift; start "$@" ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    *) echo "usage: $0 install | start [--accounting] | stop | env" >&2; exit 2 ;;
esac
