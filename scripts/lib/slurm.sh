# munge and a two-node Slurm cluster on this one machine, after
# /work/shared/recipes/slurm.md, with every file in the run directory.
#
# munged is our own too: its key, socket, pid and log live in the run
# directory and slurm.conf's AuthInfo points Slurm at that socket. So
# nothing in /etc is read or written, a munged the machine already runs is
# left alone, and cleanup stops exactly what this run started.

SLURMCTLD_PORT_FIRST=16817 # Slurm's defaults (6817, 6818) are left to a real cluster
SLURMD_PORT_FIRST=17001    # the recipe's node ports
SLURM_NODES=(n1 n2)
SLURM_IDLE_WAIT_S=30 # both nodes were idle about 4 s after start in the recipe
SRUN_LIMIT_S=60
# A cancelled step's slurmstepd took about 2.5 s to end here; a slurmd
# stopped before that keeps running, and so does the step.
STEPS_END_WAIT_S=15
SLURM_STOP_WAIT_S=15 # scontrol shutdown to the last daemon gone: 0.2 s, or seconds when a slurmd is busy

start_munged() {
    local m=$1/munge
    # munged wants its socket directory searchable by all (clients must
    # reach the socket); the key inside stays readable by munge alone.
    mkdir -m 755 "$m"
    # 1024 random bytes is what mungekey makes; munged needs at least 32.
    dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chmod 400 "$m/munge.key"
    chown -R munge:munge "$m"
    runuser -u munge -- munged --socket="$m/munge.socket" \
        --key-file="$m/munge.key" --pid-file="$m/munged.pid" \
        --log-file="$m/munged.log" --seed-file="$m/munged.seed" ||
        { show_logs "$m/munged.log"; die "munged did not start"; }
    munge -S "$m/munge.socket" -n </dev/null | unmunge -S "$m/munge.socket" >/dev/null ||
        { show_logs "$m/munged.log"; die "munge -n | unmunge failed"; }
}

write_slurm_conf() {
    local dir=$1 ctld_port=$2 node_port=$3 cpus
    cpus=$(nproc)
    cat >"$dir/slurm.conf" <<CONF
# Written by scripts/test for one run: two nodes, n1 and n2, both this
# machine, each its own slurmd on its own port.
ClusterName=miniray
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
# No cgroups: processes are tracked by parent pid, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down comes back by itself once its slurmd registers.
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/slurm/state
SlurmdSpoolDir=$dir/slurm/spool-%n
SlurmctldPidFile=$dir/slurm/slurmctld.pid
SlurmdPidFile=$dir/slurm/slurmd-%n.pid
SlurmctldLogFile=$dir/slurm/slurmctld.log
SlurmdLogFile=$dir/slurm/slurmd-%n.log
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$node_port-$((node_port + 1))] CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

# Two free ports in a row for the two slurmd, as Port=[a-b] needs.
free_port_pair() {
    local port=$1
    while true; do
        port=$(free_port "$port")
        [[ $(free_port $((port + 1))) == $((port + 1)) ]] && break
        ((port += 2))
    done
    echo "$port"
}

idle_nodes() { sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$' || true; }
all_idle() { [[ $(idle_nodes) == "${#SLURM_NODES[@]}" ]]; }

slurm_logs() { show_logs "$1/munge/munged.log" "$1"/slurm/*.log; }

start_slurm() {
    local dir=$1 ctld_port node_port node out
    [[ $EUID -eq 0 ]] || die "the Slurm cluster runs its daemons as root" \
        "(SlurmUser=root, munged as user munge): run scripts/test as root"
    mkdir -p "$dir/slurm/state"
    start_munged "$dir"
    ctld_port=$(free_port "$SLURMCTLD_PORT_FIRST")
    node_port=$(free_port_pair "$SLURMD_PORT_FIRST")
    write_slurm_conf "$dir" "$ctld_port" "$node_port"
    # Every Slurm command and daemon from here on, the tests included,
    # reads this file and never /etc/slurm.
    export SLURM_CONF=$dir/slurm.conf
    # -f as well, so the command line names the run (see procs.sh).
    slurmctld -f "$SLURM_CONF" || { slurm_logs "$dir"; die "slurmctld did not start"; }
    for node in "${SLURM_NODES[@]}"; do
        mkdir -p "$dir/slurm/spool-$node"
        slurmd -f "$SLURM_CONF" -N "$node" ||
            { slurm_logs "$dir"; die "slurmd -N $node did not start"; }
    done
    if ! wait_until "$SLURM_IDLE_WAIT_S" all_idle; then
        sinfo -N >&2 || true
        slurm_logs "$dir"
        die "after ${SLURM_IDLE_WAIT_S} s, $(idle_nodes) of ${#SLURM_NODES[@]} nodes are idle"
    fi
    # One task on each node, each printing this machine's name (both
    # nodes are this machine).
    out=$(timeout "$SRUN_LIMIT_S" srun -N2 -n2 hostname 2>&1) || true
    if [[ $out != "$(hostname)"$'\n'"$(hostname)" ]]; then
        printf '%s\n' "$out" >&2
        slurm_logs "$dir"
        die "srun -N2 -n2 hostname did not print the host name twice"
    fi
    note "slurmctld on port $ctld_port, slurmd n1 n2 on ports $node_port $((node_port + 1))"
    export MINIRAY_TEST_SLURM=1
}

# This run's Slurm daemons named COMM (a regular expression), by pid.
slurm_daemons_of() {
    local pid comm dir
    daemons_of_runs | while read -r pid comm dir; do
        [[ $comm =~ ^($2)$ && $dir == "$1" ]] && echo "$pid"
    done
    return 0
}
no_stepds() { [[ -z $(slurm_daemons_of "$1" slurmstepd) ]]; }
no_slurm_daemons() { [[ -z $(slurm_daemons_of "$1" 'slurmctld|slurmd|slurmstepd') ]]; }

# scontrol shutdown is the recipe's stop (slurmctld and both slurmd), once
# the jobs a test left are cancelled and their steps ended. A slurmd
# removes its pid file as it begins to shut down, and may take seconds
# more, so the daemons are found by their run directory; whichever is
# still there after that gets TERM, then KILL.
stop_slurm() {
    local dir=$1 pid
    [[ -f $dir/slurm.conf ]] || return 0
    if pid_of "$dir/slurm/slurmctld.pid" >/dev/null; then
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
        wait_until "$STEPS_END_WAIT_S" no_stepds "$dir" ||
            note "steps still ending after ${STEPS_END_WAIT_S} s:" \
                "$(slurm_daemons_of "$dir" slurmstepd | tr '\n' ' ')"
        SLURM_CONF=$dir/slurm.conf timeout 10 scontrol shutdown >/dev/null 2>&1 || true
        wait_until "$SLURM_STOP_WAIT_S" no_slurm_daemons "$dir" || true
    fi
    for pid in $(slurm_daemons_of "$dir" 'slurmctld|slurmd|slurmstepd'); do
        note "stopping $(cat "/proc/$pid/comm" 2>/dev/null) $pid, still running after shutdown"
        stop_pid "$pid"
    done
}

stop_munged() {
    local pid
    if pid=$(pid_of "$1/munge/munged.pid"); then stop_pid "$pid"; fi
}
