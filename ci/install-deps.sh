#!/usr/bin/env bash
# Install what the build and the tests need, idempotently; a no-op (under a second) when
# everything is already there.
#
#   ci/install-deps.sh
#
# Debian 12 (bookworm) packages:
#   qemu-system-x86 from bookworm-backports (10.x; the bookworm 7.2 package would replace the
#     backported qemu-utils 10 and with it qemu-storage-daemon 10), qemu-utils (for
#     qemu-storage-daemon), linux-image-amd64 (the guest kernel), busybox-static, fio, cpio,
#     kmod (modprobe --show-depends).
# Rust: the clippy and rustfmt components of the active toolchain.
# Runs apt-get as root, or through sudo when not root.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }

as_root=()
if [[ $(id -u) -ne 0 ]]; then
    as_root=(sudo)
fi

# --- Debian packages -------------------------------------------------------------------
missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for pkg in busybox-static fio cpio kmod linux-image-amd64 qemu-utils qemu-system-x86; do
    have_pkg "$pkg" || missing+=("$pkg")
done
# The qemu-system-x86 we want is the one matching the backported qemu-utils (10.x).
if have_pkg qemu-system-x86; then
    qemu_major=$(dpkg-query -W -f='${Version}' qemu-system-x86 | sed -E 's/^[0-9]+://; s/\..*//')
    if [[ "$qemu_major" -lt 10 ]]; then
        missing+=(qemu-system-x86)
    fi
fi
compgen -G '/boot/vmlinuz-*' >/dev/null || missing+=(linux-image-amd64)

if [[ ${#missing[@]} -eq 0 ]]; then
    log "Debian packages present"
elif ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]} and no apt-get: install them by hand"
    exit 1
else
    log "installing ${missing[*]}"
    # shellcheck disable=SC1091 # a system file
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    backports=()
    if [[ "$codename" == bookworm ]]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            log "adding bookworm-backports"
            echo 'deb http://deb.debian.org/debian bookworm-backports main' |
                "${as_root[@]}" tee /etc/apt/sources.list.d/backports.list >/dev/null
        fi
        backports=(-t bookworm-backports)
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install=(apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold)
    "${as_root[@]}" apt-get update -q
    # QEMU first and from backports, together with qemu-utils so both stay at 10.x.
    "${as_root[@]}" "${apt_install[@]}" "${backports[@]}" qemu-system-x86 qemu-utils
    "${as_root[@]}" "${apt_install[@]}" busybox-static fio cpio kmod linux-image-amd64
fi
command -v qemu-storage-daemon >/dev/null || { log "qemu-storage-daemon missing after install"; exit 1; }

# --- Rust components -------------------------------------------------------------------
if command -v rustup >/dev/null; then
    installed=$(rustup component list --installed 2>/dev/null || true)
    for comp in clippy rustfmt; do
        if ! grep -q "^$comp" <<<"$installed"; then
            log "rustup component add $comp"
            rustup component add "$comp"
        fi
    done
else
    log "no rustup; assuming cargo clippy and cargo fmt come with the toolchain"
fi
log "done"
