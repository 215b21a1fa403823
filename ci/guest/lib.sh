# shellcheck shell=bash
# Helpers shared by the guest scripts (sourced, not run).

# guest_kernel: path of the guest kernel. TANDEM_GUEST_KERNEL overrides; otherwise the
# newest installed Debian kernel in /boot (linux-image-amd64). The host's running kernel is
# not used: CI hosts often run a custom kernel whose modules are not on disk.
guest_kernel() {
    if [[ -n "${TANDEM_GUEST_KERNEL:-}" ]]; then
        echo "$TANDEM_GUEST_KERNEL"
        return
    fi
    local k
    k=$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$k" ]]; then
        echo "no guest kernel: install linux-image-amd64 (ci/install-deps.sh) or set TANDEM_GUEST_KERNEL" >&2
        return 1
    fi
    echo "$k"
}

# kernel_release KERNEL_PATH: "6.1.0-56-amd64" from "/boot/vmlinuz-6.1.0-56-amd64".
kernel_release() {
    local base
    base=$(basename "$1")
    echo "${base#vmlinuz-}"
}

# guest_accel: "kvm" when hardware virtualisation really works, "tcg" otherwise.
# TANDEM_GUEST_ACCEL=kvm|tcg overrides. The paravirtual kvm_pvm module exposes /dev/kvm
# but cannot run a stock guest kernel usefully, so its presence means TCG.
guest_accel() {
    if [[ -n "${TANDEM_GUEST_ACCEL:-}" ]]; then
        echo "$TANDEM_GUEST_ACCEL"
        return
    fi
    if [[ -d /sys/module/kvm_pvm ]]; then
        echo tcg
        return
    fi
    if [[ -r /dev/kvm && -w /dev/kvm ]] && { [[ -d /sys/module/kvm_intel ]] || [[ -d /sys/module/kvm_amd ]]; }; then
        echo kvm
        return
    fi
    echo tcg
}
