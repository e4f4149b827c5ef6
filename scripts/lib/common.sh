# Helpers shared by scripts/test: step lines, failing with a message,
# bounded waits, free ports, and who owns a run directory.

step() { printf '\n== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() { printf 'scripts/test: %s\n' "$*" >&2; exit 1; }

# Print the named files, so a failure shows why without a rerun.
show_logs() {
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        printf -- '--- %s (last 40 lines)\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
}

# wait_until SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds
# or SECONDS pass. Every wait is bounded so a broken daemon fails the run
# instead of hanging it.
wait_until() {
    local limit_s=$1 tries
    shift
    for ((tries = limit_s * 5; tries > 0; tries--)); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}

# The first TCP port from $1 up that nothing listens on, on any address.
# Another process may still take it before we bind; the checks after each
# start catch that.
free_port() {
    local port=$1
    while [[ -n $(ss -Hltn "sport = :$port") ]]; do
        ((port++))
    done
    echo "$port"
}

# A process's start time (field 22 of /proc/PID/stat), which with the pid
# names one process even after the pid is reused.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # shellcheck disable=SC2086 # split the fields after "(comm) " on purpose
    set -- ${stat##*) }
    echo "${20}"
}

# Whether the scripts/test run that made run directory $1 is still alive.
# A directory with no owner file yet is being set up, so counts as alive.
owner_alive() {
    local dir=$1 pid started
    [[ -d $dir ]] || return 1
    [[ -f $dir/owner ]] || return 0
    read -r pid started <"$dir/owner"
    [[ $(start_time "$pid") == "$started" ]]
}

# Whether process $1 runs. A daemon that exited stays a zombie until
# init reaps it, which here takes up to about 2 s; kill -0 would still see
# it, so read its state instead.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# pid_of FILE: the pid in a daemon's pid file, if it names a live process.
pid_of() {
    local pid
    [[ -s $1 ]] || return 1
    read -r pid <"$1"
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && echo "$pid"
}

STOP_WAIT_S=5 # a daemon that ignores TERM this long gets KILL
KILL_WAIT_S=2 # a KILLed process is gone within milliseconds; this is slack

# Returns once the process is gone, so that the check for leftovers after
# a stop never finds one still dying of its KILL.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_until "$STOP_WAIT_S" eval "! alive $pid" && return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait_until "$KILL_WAIT_S" eval "! alive $pid" || true
}

descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}

# stop_tree PID: PID and everything under it, all listed before any is
# signalled (an orphan moves to init, out of reach of pgrep -P).
stop_tree() {
    local pid pids
    mapfile -t pids < <(echo "$1" && descendants "$1")
    kill -TERM "${pids[@]}" 2>/dev/null
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
}
