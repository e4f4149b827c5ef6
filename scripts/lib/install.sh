# Installing the real parts the tests need, only those that are missing.

# command that proves a package is there -> the Debian package that has it
declare -A PACKAGE_OF=(
    [sshd]=openssh-server
    [ssh]=openssh-client
    [ssh-keygen]=openssh-client
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [srun]=slurm-client
    [sinfo]=slurm-client
    [munged]=munge
    [ip]=iproute2
    [ss]=iproute2
    [pgrep]=procps
    [python3]=python3
)

missing_packages() {
    local cmd
    for cmd in "${!PACKAGE_OF[@]}"; do
        command -v "$cmd" >/dev/null || echo "${PACKAGE_OF[$cmd]}"
    done | sort -u
}

# Install with apt, quietly, its output kept in $1 for when it fails.
# Package scripts would start the system's own sshd, munged and slurm
# daemons (no systemd here, so invoke-rc.d runs the init scripts); a
# policy-rc.d that answers 101 ("action not allowed") keeps them stopped.
# Docker-built images already have one, which is then left as it is.
install_packages() {
    local log=$1 made_policy='' ok=1 packages
    mapfile -t packages < <(missing_packages)
    if ((${#packages[@]} == 0)); then note "all present"; return 0; fi
    if [[ $EUID -ne 0 ]]; then
        die "missing ${packages[*]}; as root run: apt-get update &&" \
            "apt-get install -y --no-install-recommends ${packages[*]}"
    fi
    note "installing: ${packages[*]}"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${packages[@]}"; } >"$log" 2>&1 || ok=
    if [[ -n $made_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi
    [[ -n $ok ]] || { show_logs "$log"; die "apt-get could not install ${packages[*]}"; }
    mapfile -t packages < <(missing_packages)
    ((${#packages[@]} == 0)) || die "still missing after apt-get: ${packages[*]}"
}
