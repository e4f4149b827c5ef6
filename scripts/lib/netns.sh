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
