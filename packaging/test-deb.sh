#!/usr/bin/env bash
# Builds the .deb with cargo-deb, installs it into a clean Debian root (debootstrap, minbase),
# starts the service exactly as its systemd unit says (the unit's ExecStart, as the `dps` user,
# with CAP_NET_BIND_SERVICE as its only capability), checks that it serves (the CLI inside the
# root lists enrollments over TLS, the metrics answer), stops it with SIGTERM and checks it exits 0.
#
# DEB_PROFILE=dev (the default here, for CI: it packages the debug build the tests already made)
# or DEB_PROFILE=release (what an operator ships). Needs root; binds 443, 8883, 5671, 9464, 9465.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${DEB_PROFILE:-dev}
if ! command -v debootstrap >/dev/null || ! command -v dpkg-shlibdeps >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap dpkg-dev
fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
if [ "$profile" = dev ]; then
  cargo build -q -p dps-gateway --bin dps
  deb=$(cargo deb -p dps-gateway --profile dev --no-build --no-strip 2>/dev/null | tail -n 1)
else
  deb=$(cargo deb -p dps-gateway 2>/dev/null | tail -n 1)
fi
[ -f "$deb" ] || { echo "cargo deb made no package ($deb)"; exit 1; }
echo "package: $deb"
dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Depends\|Architecture\):/  \1:/p'

# The unit parses without a complaint (systemd-analyze warns on unknown keys and bad values but
# still exits 0, so any output fails; the binary path is swapped for one that exists here).
if command -v systemd-analyze >/dev/null; then
  unit_dir=$(mktemp -d)
  sed 's|^ExecStart=/usr/bin/dps|ExecStart=/bin/true|' packaging/dps.service >"$unit_dir/dps.service"
  complaints=$(systemd-analyze verify "$unit_dir/dps.service" 2>&1 || true)
  rm -rf "$unit_dir"
  [ -z "$complaints" ] || { echo "systemd-analyze verify: $complaints"; exit 1; }
fi

root=$(mktemp -d /tmp/dps-deb-root.XXXXXX)
chmod 755 "$root"
pid=
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  umount "$root/proc" "$root/sys" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
cp "$deb" "$root/tmp/dps.deb"
chroot "$root" dpkg -i /tmp/dps.deb
for f in /usr/bin/dps /lib/systemd/system/dps.service /etc/dps/dps.toml /usr/share/dps/grafana-dashboard.json; do
  [ -e "$root$f" ] || { echo "the package did not install $f"; exit 1; }
done
chroot "$root" dpkg-query -W -f='${Conffiles}\n' dps | grep -q /etc/dps/dps.toml || { echo "dps.toml is not a conffile"; exit 1; }
chroot "$root" getent passwd dps >/dev/null || { echo "no dps user"; exit 1; }
[ "$(chroot "$root" stat -c '%U %a' /var/lib/dps)" = "dps 700" ] || { echo "/var/lib/dps is not the dps user's, mode 700"; exit 1; }

# /proc, /sys and /etc/hosts as a booted system has them (the executors read the CPU topology from /sys).
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
[ -s "$root/etc/hosts" ] || printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"
exec_start=$(sed -n 's/^ExecStart=//p' "$root/lib/systemd/system/dps.service")
# What systemd does for the unit: User=dps, AmbientCapabilities= and CapabilityBoundingSet=
# CAP_NET_BIND_SERVICE, NoNewPrivileges=yes.
# shellcheck disable=SC2086
chroot "$root" setpriv --reuid=dps --regid=dps --init-groups --no-new-privs \
  --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service --bounding-set=-all,+net_bind_service \
  -- $exec_start >"$root/tmp/dps.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  [ -f "$root/var/lib/dps/endpoint.json" ] && break
  kill -0 "$pid" 2>/dev/null || { head -n 30 "$root/tmp/dps.log"; echo "dps exited during start-up"; exit 1; }
  sleep 0.1
done
[ -f "$root/var/lib/dps/endpoint.json" ] || { cat "$root/tmp/dps.log"; echo "no endpoint.json"; exit 1; }
[ "$(chroot "$root" stat -c '%U %a' /var/lib/dps/endpoint.json)" = "dps 600" ] || { echo "endpoint.json is not private to dps"; exit 1; }
# The CLI in the same root, over TLS to the service on 443 as the endpoint file says.
list=$(chroot "$root" dps enrollment list --endpoint /var/lib/dps/endpoint.json --output json)
[ "$list" = "[]" ] || { echo "enrollment list answered: $list"; exit 1; }
chroot "$root" dps enrollment create --endpoint /var/lib/dps/endpoint.json --registration-id deb-device-1 --output json >/dev/null
chroot "$root" dps enrollment show --endpoint /var/lib/dps/endpoint.json --registration-id deb-device-1 --output json | grep -q '"deb-device-1"'
exec 3<>/dev/tcp/127.0.0.1/9464
printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
grep -q '^dps_service_operations_total' <&3 || { echo "metrics lack the service operations"; exit 1; }
exec 3<&-
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] || { cat "$root/tmp/dps.log"; echo "dps exited $rc on SIGTERM"; exit 1; }
echo "the .deb installs into a clean Debian root, starts as its unit says, serves, and stops cleanly"
