# A private sshd on 127.0.0.1 and 127.0.0.2 with a throwaway key, and the
# client config that reaches it.

SSH_PORT_FIRST=22022 # clear of 22 and of the ports people usually forward

# Linux routes all of 127.0.0.0/8 to lo, so two addresses make two "hosts"
# for a two-node Cluster without any network setup.
SSH_HOSTS=(127.0.0.1 127.0.0.2)

write_sshd_config() {
    local dir=$1 port=$2
    cat >"$dir/sshd_config" <<CONF
# Written by scripts/test for one run; nothing here is read from /etc/ssh.
Port $port
ListenAddress ${SSH_HOSTS[0]}
ListenAddress ${SSH_HOSTS[1]}
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# The key files live in a temporary directory sshd would call unsafe.
StrictModes no
UsePAM no
# No AcceptEnv: a test sees only the environment sshd itself gives.
CONF
}

write_ssh_config() {
    local dir=$1 port=$2
    cat >"$dir/ssh_config" <<CONF
# Written by scripts/test: ssh -F $dir/ssh_config 127.0.0.1 ...
Host *
    Port $port
    IdentityFile $dir/id
    IdentitiesOnly yes
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking no
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
CONF
}

start_sshd() {
    local dir=$1 port host
    port=$(free_port "$SSH_PORT_FIRST")
    ssh-keygen -q -t ed25519 -N "" -C miniray-test-host -f "$dir/host_ed25519"
    ssh-keygen -q -t ed25519 -N "" -C miniray-test-client -f "$dir/id"
    cp "$dir/id.pub" "$dir/authorized_keys"
    write_sshd_config "$dir" "$port"
    write_ssh_config "$dir" "$port"
    # sshd refuses to start without its privilege separation directory.
    if [[ $EUID -eq 0 ]]; then install -d -m 755 /run/sshd; fi
    # sshd re-executes itself, so it must be started by absolute path.
    "$(command -v sshd)" -f "$dir/sshd_config" -E "$dir/sshd.log" ||
        { show_logs "$dir/sshd.log"; die "sshd did not start"; }
    wait_until 5 pid_of "$dir/sshd.pid" >/dev/null ||
        { show_logs "$dir/sshd.log"; die "sshd wrote no pid file"; }
    for host in "${SSH_HOSTS[@]}"; do
        timeout 20 ssh -F "$dir/ssh_config" "$host" true ||
            { show_logs "$dir/sshd.log"; die "ssh to $host:$port failed"; }
    done
    note "sshd on ${SSH_HOSTS[*]} port $port"
    export MINIRAY_TEST_SSH_CONFIG=$dir/ssh_config
    export MINIRAY_TEST_SSH_PORT=$port
}

# Sessions a test left open, and what they run, are under the listener.
stop_sshd() {
    local pid
    if pid=$(pid_of "$1/sshd.pid"); then stop_tree "$pid"; fi
}
