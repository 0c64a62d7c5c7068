#!/usr/bin/env bash
# Prove the aarch64 (Raspberry Pi OS / Debian arm64) install on an x86 machine.
#
# Builds an arm64 Debian root with debootstrap + qemu-user-static (binfmt), installs the
# wheel built from this checkout with the [edge] extra from the package registry (so every
# edge dependency must have an aarch64 wheel), and runs a smoke test in it:
# `biofed --version`, `biofed replay` of one EDF, `biofed warmup`. Everything runs
# emulated, so it takes a long time: not part of CI.
#
# Usage (as root):  scripts/pi_arm64_smoke.sh RECORDING.edf [WORK_DIR]
# Needs: debootstrap, qemu-user-static, binfmt-support (Debian packages), network access to
# the Debian mirror and PyPI only. WORK_DIR (default /var/tmp/biofed-arm64) keeps the root
# between runs; delete it to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

edf="${1:?usage: $0 RECORDING.edf [WORK_DIR]}"
work="${2:-/var/tmp/biofed-arm64}"
root="$work/root"
suite="${BIOFED_DEBIAN_SUITE:-bookworm}"          # Python 3.11, as Raspberry Pi OS bookworm
mirror="${BIOFED_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
started=$(date +%s)
step() { echo "[$(( $(date +%s) - started )) s] $*"; }

if [ "$(id -u)" -ne 0 ]; then echo "run as root (debootstrap, chroot)" >&2; exit 2; fi
for tool in debootstrap qemu-aarch64-static update-binfmts; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install debootstrap qemu-user-static binfmt-support" >&2; exit 2; }
done
# binfmt: the kernel runs aarch64 binaries through qemu-aarch64-static.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "binfmt for aarch64 is not enabled" >&2; exit 2; }

mkdir -p "$work"
step "building the wheel"
rm -rf "$work/dist" && python3 -m pip wheel -q --no-deps -w "$work/dist" . >/dev/null
wheel=$(ls "$work/dist"/biofed-*.whl)

if [ ! -x "$root/usr/bin/python3" ]; then
    step "debootstrap $suite arm64 into $root"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's CA bundle, for networks whose HTTPS goes through an inspecting proxy.
ca_bundle="${BIOFED_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
mkdir -p "$root/etc/ssl/certs" && cp "$ca_bundle" "$root/etc/ssl/certs/host-ca-bundle.crt"
mkdir -p "$root/proc" && mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
cp "$wheel" "$root/tmp/" && cp "$edf" "$root/tmp/recording.edf"
in_root() {
    chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/biofed/bin:/usr/bin:/bin \
        PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

step "uname in the root: $(in_root uname -m)"
step "installing $(basename "$wheel")[edge] (binary wheels only)"
in_root python3 -m venv --clear /opt/biofed  # a fresh environment: the same version would not be reinstalled
in_root /opt/biofed/bin/pip install -q --only-binary=:all: "/tmp/$(basename "$wheel")[edge]"
step "biofed --version"; in_root biofed --version
step "biofed replay of one EDF"; in_root biofed replay /tmp/recording.edf --speed 0 --no-progress
step "biofed warmup (cold)"; in_root biofed warmup
step "biofed warmup (cached)"; in_root biofed warmup
step "size of the installed environment: $(du -sh "$root/opt/biofed" | cut -f1)"
step "aarch64 smoke test passed"
