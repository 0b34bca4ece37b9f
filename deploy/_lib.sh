# Shared by the deploy/ scripts (sourced, not run): each defines say() and die() with its own prefix first.

# apt_install PACKAGE...: Debian's packages, without letting their maintainer scripts start the distribution's
# daemons (slurmctld, munged, a PostgreSQL cluster on 5432): the scripts start their own. A policy-rc.d that the
# machine already has is left as it is; ours is removed however apt-get ends.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get is missing: install $* by hand"
    say "installing $* with apt-get"
    local own_policy=0 rc=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    } || rc=$?
    [ "$own_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc) while installing $*"
}
