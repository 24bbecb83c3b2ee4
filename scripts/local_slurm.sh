#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this machine, for the real-cluster tests and for trying
# `rlkd launch slurm` by hand:
#
#   bash scripts/local_slurm.sh up DIR      # munged, slurmctld, slurmd n1 and n2; prints the SLURM_CONF line
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch / srun / sinfo talk to it
#   bash scripts/local_slurm.sh down DIR    # stops the daemons this script started; DIR keeps the logs
#
# Needs Debian's `slurmd slurmctld slurm-client munge` (multiple-slurmd mode is built in). Both nodes
# are 127.0.0.1 under the node names n1 and n2 (names no resolver knows, like a real cluster's node
# names that differ from host names). Everything lives under DIR; ports are
# RLKD_SLURM_PORT_BASE (default 17000) for slurmctld and the next two for the slurmds.
set -euo pipefail

# The daemons live in /usr/sbin, which a non-root PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
port_base=${RLKD_SLURM_PORT_BASE:-17000}
cpus_per_node=${RLKD_SLURM_CPUS_PER_NODE:-2}

stop_pidfile() {  # stop the daemon whose pid file is $1, if it is still running
    local pidfile=$1 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

down() {
    for node in n1 n2; do stop_pidfile "$dir/run/slurmd-$node.pid"; done
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/run/munged.pid"
    echo "local slurm: stopped (logs in $dir/log)"
}

up() {
    for bin in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$bin" >/dev/null || { echo "local slurm: $bin not found; apt-get install slurmd slurmctld slurm-client munge" >&2; exit 1; }
    done
    down >/dev/null
    mkdir -p "$dir"/{munge,state,log,run,spool/n1,spool/n2}
    # munged refuses keys and sockets in group/world-writable places.
    chmod 700 "$dir" "$dir/munge"
    [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

    local user memory
    user=$(id -un)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
    cat > "$dir/slurm.conf" <<EOF
ClusterName=rlkdlocal
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$port_base
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (Slurm default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start a requeued job soon after its wait (cred_expire) ends, not at the next 60 s scheduling pass.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=10
# Node names are not host names: jobs must find the rendezvous address from NodeAddr.
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((port_base + 1)) CPUs=$cpus_per_node RealMemory=$memory State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((port_base + 2)) CPUs=$cpus_per_node RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" -c   # -c: a clean start, no state from an earlier cluster in DIR
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$') -eq 2 ]]; then
            echo "local slurm: up; export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "local slurm: nodes did not become idle; sinfo says:" >&2
    sinfo -N >&2 || true
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
