#!/usr/bin/env bash
# Installs the Debian packages the tests use, when running as root and they are missing.
set -euo pipefail
bash "$(dirname "$0")/vm-deps.sh" || echo "note: QEMU or the test kernel could not be installed; the vm tests will skip" >&2
need=()
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -f /usr/include/mosquitto_plugin.h ] || need+=(mosquitto-dev)  # oak's login plugin for mosquitto
[ -f /usr/include/mosquitto.h ] || need+=(libmosquitto-dev)  # the plugin's other header
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)  # the same plugin checks passwords with OpenSSL
command -v cc >/dev/null || need+=(gcc)
command -v runc >/dev/null || need+=(runc)
command -v ctr >/dev/null || need+=(containerd)
command -v crun >/dev/null || need+=(crun)  # OCI runtimes by name (tests/test_runtimes.py)
command -v runsc >/dev/null || need+=(runsc)  # gVisor
[ -x /usr/bin/chromium ] || need+=(chromium)  # the dashboard in a browser (tests/tui/test_web.py)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v zsh >/dev/null || need+=(zsh)  # oak's completion script is loaded in bash and zsh (tests/test_completion.py)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v umoci >/dev/null || need+=(umoci)
command -v skopeo >/dev/null || need+=(skopeo)  # registry pulls; with the next two, tests/test_registry.py
command -v docker-registry >/dev/null || need+=(docker-registry)  # a real private registry on loopback
command -v htpasswd >/dev/null || need+=(apache2-utils)  # its logins
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v ethtool >/dev/null || [ -x /usr/sbin/ethtool ] || need+=(ethtool)  # the network lab's receive offload
command -v iperf3 >/dev/null || need+=(iperf3)  # bench/overlay.py
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: missing ${need[*]}; tests that need them will be skipped (install them as root to run those)" >&2
  exit 0
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${need[@]}" >/dev/null
