# docker/common.sh: what docker/ci.sh and docker/cuda.sh both need. Source it, then call:
#
# ensure_docker [PACKAGE...]: the Debian packages docker, iptables, debootstrap (and the extra ones
# named) installed when missing, and dockerd started when none answers; its pid goes into DOCKERD_PID,
# which the caller's cleanup stops. Needs CACHE and the caller's log and die.
#
# ensure_base_image: the local base image both build on (no registry
# is reachable here): debootstrap a Debian rootfs with python3 from the Debian mirror this machine's apt
# uses, and `docker import` it as $BASE_IMAGE. The rootfs tarball is cached in $CACHE under a key of the
# suite, the packages and the mirror, and the image carries that key, so either script reuses the other's.
#
# It needs SUITE, CACHE, BASE_IMAGE and the caller's log and die.
# Environment: MHA_CI_DEBIAN_MIRROR (default: the mirror of /etc/apt's sources).

ensure_docker() {
    local apt_pkgs=("$@")
    command -v dockerd >/dev/null || apt_pkgs+=(docker.io)
    command -v iptables >/dev/null || apt_pkgs+=(iptables)
    command -v debootstrap >/dev/null || apt_pkgs+=(debootstrap)
    if [ ${#apt_pkgs[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing ${apt_pkgs[*]} and not root to install them"
        log "apt-get install ${apt_pkgs[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}" >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: $CACHE/dockerd.log)"
        dockerd >"$CACHE/dockerd.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log"; die "dockerd did not come up"; }
    fi
}

ensure_base_image() {
local mirror INCLUDE base_key tarball rootfs
mirror=${MHA_CI_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then # the mirror this machine's apt uses
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
mirror=${mirror%/}
INCLUDE=python3,python3-venv,ca-certificates
base_key=$(printf '%s %s %s v1' "$SUITE" "$INCLUDE" "$mirror" | sha256sum | cut -c1-12)
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    && [ "$(docker image inspect -f '{{index .Config.Labels "org.mha-serve.base-key"}}' "$BASE_IMAGE" 2>/dev/null)" = "$base_key" ]; then
    log "$BASE_IMAGE cached"
else
    tarball=$CACHE/rootfs-$SUITE-$base_key.tar
    if [ ! -s "$tarball" ]; then
        log "debootstrap $SUITE (minbase + $INCLUDE) from $mirror"
        rootfs=$CACHE/rootfs.$$.tmp # per process: ci.sh and cuda.sh may run at once
        # a debootstrap killed half-way can leave /proc or /sys mounted inside: unmount before rm
        grep -o " $rootfs/[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb ${mirror}-security $SUITE-security main
EOF
        # as in Debian's own container images: no docs, man pages or translations
        cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
        printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/99no-recommends"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/var/log/*.log "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
        find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
        tar -C "$rootfs" --numeric-owner -cf "$tarball.$$.tmp" .
        mv "$tarball.$$.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "docker import $tarball -> $BASE_IMAGE"
    docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' \
        -c "LABEL org.mha-serve.base-key=$base_key" "$tarball" "$BASE_IMAGE" >/dev/null
fi
}
