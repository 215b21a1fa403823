#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build the tiny initramfs the guest tests and benches boot.
#
#   ci/guest/build-initramfs.sh [--fio] OUTDIR
#
# Prints the path of the initramfs (a gzip'd newc cpio) on stdout. Contents: busybox-static,
# the virtio-pci / virtio-blk kernel modules of the guest kernel (only those that Debian builds
# as modules, in dependency order), an /init, and with --fio also fio and its shared libraries.
# The result is cached in OUTDIR under a hash of every input, so a second call is instant.
#
# /init mounts proc/sys/devtmpfs, loads the modules, waits for /dev/vda when a virtio disk is
# attached, runs /tandem/script.sh (which run-guest.sh appends as a second cpio segment), and
# prints on the serial console:
#   TANDEM-RESULT-BEGIN
#   ...the script's stdout and stderr...
#   TANDEM-RESULT-END
#   TANDEM-EXIT <status>
# then powers the guest off.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

with_fio=0
if [[ "${1:-}" == "--fio" ]]; then
    with_fio=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--fio] OUTDIR" >&2
    exit 2
fi
outdir=$1
mkdir -p "$outdir"

kernel=$(guest_kernel)
kver=$(kernel_release "$kernel")
moddir=/lib/modules/$kver
[[ -d "$moddir" ]] || { echo "no modules for $kver in $moddir" >&2; exit 1; }
busybox=$(command -v busybox || true)
[[ -n "$busybox" ]] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked' && ldd "$busybox" >/dev/null 2>&1; then
    echo "$busybox is dynamically linked: install busybox-static" >&2
    exit 1
fi

# Modules: what modprobe would insmod for virtio_blk and virtio_pci, deduplicated, in order.
# Built-in drivers show up as "builtin ..." lines and need nothing.
# (One module per modprobe call: further arguments would be taken as module parameters.
# modprobe lives in /usr/sbin, which a non-root PATH may lack.)
modprobe=$(PATH=$PATH:/usr/sbin:/sbin command -v modprobe || true)
[[ -n "$modprobe" ]] || { echo "modprobe not found: apt-get install kmod" >&2; exit 1; }
mapfile -t modules < <(
    for m in virtio_pci virtio_blk; do
        "$modprobe" -S "$kver" --show-depends "$m"
    done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
)
[[ ${#modules[@]} -gt 0 ]] || echo "note: virtio drivers are all built into $kver" >&2

# fio and the shared libraries it needs (plus the dynamic loader).
fio_files=()
if [[ $with_fio -eq 1 ]]; then
    fio=$(command -v fio || true)
    [[ -n "$fio" ]] || { echo "fio not found: apt-get install fio" >&2; exit 1; }
    fio_files+=("$fio")
    while read -r lib; do
        fio_files+=("$lib")
    done < <(ldd "$fio" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }')
fi

# Cache key: this script, lib.sh, the binaries and modules that go in.
key=$(
    {
        sha256sum "$0" "$here/lib.sh" "$busybox"
        echo "$with_fio $kver"
        for f in "${modules[@]}" "${fio_files[@]}"; do
            echo "$f $(stat -L -c '%s %Y' "$f")"
        done
    } | sha256sum | cut -c1-16
)
variant=base
[[ $with_fio -eq 1 ]] && variant=fio
out="$outdir/initramfs-$variant-$kver-$key.cpio.gz"
if [[ -s "$out" ]]; then
    echo "$out"
    exit 0
fi

stage=$(mktemp -d "$outdir/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,tandem,var/tmp}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] && continue
    ln -sf busybox "$stage/bin/$applet"
done

: >"$stage/etc/modules-order"
for m in "${modules[@]}"; do
    name=$(basename "$m")
    case "$name" in
    *.ko) cp "$m" "$stage/lib/modules/$name" ;;
    *.ko.xz) xz -dc "$m" >"$stage/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$m" >"$stage/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz) gzip -dc "$m" >"$stage/lib/modules/${name%.gz}"; name=${name%.gz} ;;
    *) echo "unknown module format: $m" >&2; exit 1 ;;
    esac
    echo "$name" >>"$stage/etc/modules-order"
done

for f in "${fio_files[@]}"; do
    mkdir -p "$stage$(dirname "$f")"
    cp -L "$f" "$stage$f"
done

cat >"$stage/init" <<'INIT'
#!/bin/sh
# Tandem test guest. See ci/guest/build-initramfs.sh.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
while read -r m; do
    insmod "/lib/modules/$m" || echo "tandem-init: insmod $m failed"
done </etc/modules-order
# Wait (up to 10 s) for the first virtio disk when the VM has one.
# (virtio-blk PCI device ids: 0x1001 transitional, 0x1042 modern.)
if grep -qsE '^0x(1001|1042)$' /sys/bus/pci/devices/*/device; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/vda ] || echo "tandem-init: /dev/vda did not appear"
fi
echo TANDEM-RESULT-BEGIN
if [ -f /tandem/script.sh ]; then
    sh /tandem/script.sh 2>&1
    rc=$?
else
    echo "tandem-init: no /tandem/script.sh"
    rc=127
fi
echo TANDEM-RESULT-END
echo "TANDEM-EXIT $rc"
sync
poweroff -f
INIT
chmod 755 "$stage/init"

tmp_out="$out.tmp.$$"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$tmp_out"
mv "$tmp_out" "$out"
# Drop stale images of this variant (older inputs); the new one is all that is used.
find "$outdir" -maxdepth 1 -name "initramfs-$variant-*.cpio.gz" ! -path "$out" -delete
echo "$out"
