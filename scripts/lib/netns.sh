# Network namespaces: tests make their own, with veth pairs, as nodes.
# Here we only prove the machine allows it.

check_netns() {
    local probe=miniray-probe-$$ err
    if ! err=$(ip netns add "$probe" 2>&1); then
        die "ip netns add failed ($err); the network tests need iproute2" \
            "and CAP_SYS_ADMIN (run as root, outside a restricted container)"
    fi
    ip netns del "$probe" || die "ip netns del $probe failed"
    export MINIRAY_TEST_NETNS=1
}

# What a killed test left: tests/cluster_real.rs names its namespaces
# mr<pid><letter> (veths mr<pid><letter>h on this side, and an unreachable
# route for 10.203.<pid % 200>.0/24) and removes them itself, unless it is
# SIGKILLed. Removed once the test process that made them is gone.
remove_leftover_netns() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | cut -d' ' -f1); do
        [[ $ns =~ ^mr([0-9]+)[a-z]$ ]] || continue
        pid=${BASH_REMATCH[1]}
        if alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == cluster_real* ]]; then
            continue
        fi
        note "removing namespace $ns left by test process $pid"
        ip link del "${ns}h" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        ip route del unreachable "10.203.$((pid % 200)).0/24" 2>/dev/null || true
    done
}
