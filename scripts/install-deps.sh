#!/bin/sh
# Install the system packages kpr's data path and tests need, and present kernel headers
# to bcc. Idempotent and quick once done: apt runs only for packages that are missing.
# Same logic as kpr.bpf.headers.ensure_kernel_headers, in shell so it runs before kpr is
# installed.
set -eu

log() { printf 'install-deps: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "not root: skipping package installation and header links"
    exit 0
fi

arch=""
if command -v dpkg >/dev/null 2>&1; then
    arch=$(dpkg --print-architecture)
else
    case "$(uname -m)" in
        x86_64) arch=amd64 ;;
        aarch64) arch=arm64 ;;
        *) arch=$(uname -m) ;;
    esac
fi

packages="python3-bpfcc linux-headers-$arch python3-venv libpcap0.8 iproute2 tcpdump arping
iperf3 bird2 gobgpd nftables iptables iputils-ping procps util-linux bpftool linux-perf"
# The kubernetes source's tests drive the test API server with a real kubectl; where none is
# installed (these machines have Google's 1.27-1.33), Debian's kubectl 1.20 will do.
command -v kubectl >/dev/null 2>&1 || packages="$packages kubernetes-client"

if [ -n "${KPR_SKIP_APT:-}" ]; then
    :
elif command -v apt-get >/dev/null 2>&1; then
    missing=""
    for p in $packages; do
        if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing="$missing $p"
        fi
    done
    if [ -n "$missing" ]; then
        log "installing:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086 # word splitting is wanted
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
else
    log "no apt-get: install the equivalents of: $packages"
fi

# Kernel headers for bcc. Kernels without shipped headers (VM kernels) get the newest
# distribution tree for this architecture: build -> the flavour tree, source -> its
# -common sibling (BCC_KERNEL_SOURCE alone fails with Debian's split trees).
# The KPR_* overrides exist for the tests, which must not touch the real links.
release=${KPR_KERNEL_RELEASE:-$(uname -r)}
moddir=${KPR_MODULES_DIR:-/lib/modules}/$release
srcdir=${KPR_SRC_DIR:-/usr/src}

valid_tree() { # build [source]
    [ -f "$1/include/generated/autoconf.h" ] || return 1
    [ -f "$1/include/linux/kconfig.h" ] && return 0
    [ -n "${2:-}" ] && [ -f "$2/include/linux/kconfig.h" ]
}

if valid_tree "$moddir/build" "$moddir/source"; then
    exit 0
fi

best=""
best_common=""
pick() { # plain_only: yes prefers 6.1.0-56-amd64 over 6.1.0-56-cloud-amd64
    for tree in $(ls -d "$srcdir"/linux-headers-*-"$arch" 2>/dev/null | sort -V); do
        name=${tree##*/linux-headers-}
        version=$(printf '%s' "$name" | sed -n 's/^\([0-9][0-9.]*\(-[0-9][0-9]*\)\{0,1\}\)-.*/\1/p')
        [ -n "$version" ] || continue
        if [ "$1" = yes ] && [ "$name" != "$version-$arch" ]; then
            continue
        fi
        common=$(sed -n 's|^[[:space:]]*include[[:space:]]\{1,\}\(/[^[:space:]]*\)/Makefile[[:space:]]*$|\1|p' "$tree/Makefile" 2>/dev/null | head -n1)
        if [ -z "$common" ] || [ ! -d "$common" ]; then
            common=$srcdir/linux-headers-$version-common
        fi
        [ -d "$common" ] || common=""
        if valid_tree "$tree" "$common"; then
            best=$tree
            best_common=${common:-$tree}
        fi
    done
}
pick yes
[ -n "$best" ] || pick no

if [ -z "$best" ]; then
    log "no kernel headers for $release and no $srcdir/linux-headers-*-$arch tree; apt-get install linux-headers-$arch"
    exit 1
fi

for link in build source; do
    if [ -e "$moddir/$link" ] && [ ! -L "$moddir/$link" ]; then
        log "$moddir/$link is a real directory but not a usable tree; leaving it alone"
        exit 1
    fi
done

mkdir -p "$moddir"
ln -sfn "$best" "$moddir/build"
ln -sfn "$best_common" "$moddir/source"
log "linked $moddir/build -> $best, source -> $best_common"
