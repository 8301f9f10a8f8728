#!/usr/bin/env bash
# The vm runtime's tests need QEMU (without its GUI recommends) and a Debian kernel. The kernel is
# unpacked into /var/cache/oakling/vm-kernel rather than installed: its package would pull in systemd.
set -euo pipefail
kernel_dir=/var/cache/oakling/vm-kernel
have_qemu() { command -v qemu-system-x86_64 >/dev/null; }
have_kernel() { compgen -G "$kernel_dir/boot/vmlinuz-*" >/dev/null; }
[ "$(uname -m)" = x86_64 ] || exit 0
have_qemu && have_kernel && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: QEMU or a test kernel is missing; the vm runtime's tests will be skipped (run as root to install)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
have_qemu || { echo "installing qemu-system-x86" >&2; apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null; }
if ! have_kernel; then
  package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  echo "unpacking $package into $kernel_dir" >&2
  work=$(mktemp -d)
  chmod 777 "$work"  # apt-get download runs as _apt
  (cd "$work" && apt-get download -qq "$package" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/root"
  mkdir -p "$(dirname "$kernel_dir")"
  rm -rf "$kernel_dir"
  mv "$work/root" "$kernel_dir"
  rm -rf "$work"
fi
