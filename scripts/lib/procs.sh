# Finding the daemons a run started, by the run directory they name.
#
# Every daemon is started with a path under its run directory on its
# command line (sshd -f, slurmd -f, munged --socket), and the Slurm ones
# also carry SLURM_CONF in their environment (so do slurmstepd and the jobs
# they start). The directory's owner file then says whether the run that
# made it is still alive: a live run's daemons are never touched, so two
# runs at once leave each other alone.

# Always under /tmp, whatever TMPDIR says, so every run finds every other's.
RUN_PREFIX=/tmp/miniray-test.
DAEMONS='sshd|slurmd|slurmctld|slurmstepd|munged'

# Lines "PID COMM DIR" for every daemon that names a run directory.
daemons_of_runs() {
    local proc pid comm dir
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        comm=$(cat "$proc/comm" 2>/dev/null) || continue
        [[ $comm =~ ^($DAEMONS)$ ]] || continue
        dir=$({ tr '\0' '\n' <"$proc/cmdline" && tr '\0' '\n' <"$proc/environ"; } 2>/dev/null |
            grep -o "${RUN_PREFIX//./\\.}[A-Za-z0-9]*" | head -n 1) || true
        [[ -n $dir ]] && echo "$pid $comm $dir"
    done
    return 0
}

# Pids of the daemons that still name run directory $1.
daemons_of() {
    local pid comm dir
    daemons_of_runs | while read -r pid comm dir; do
        [[ $dir == "$1" ]] && echo "$pid"
    done
    return 0
}

# A killed run (kill -9, a closed terminal) never ran its cleanup: stop its
# daemons, which still hold ports and the munge socket, and remove its
# directory.
stop_leftovers() {
    local pid comm dir dirs=()
    while read -r pid comm dir; do
        owner_alive "$dir" && continue
        note "stopping $comm $pid left by a killed run ($dir)"
        stop_pid "$pid"
    done < <(daemons_of_runs)
    for dir in "$RUN_PREFIX"*; do
        [[ -d $dir ]] && ! owner_alive "$dir" && dirs+=("$dir")
    done
    if ((${#dirs[@]})); then
        note "removing ${#dirs[@]} run directories of killed runs"
        rm -rf "${dirs[@]}"
    fi
}
