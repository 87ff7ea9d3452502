#!/usr/bin/env bash
# Builds the test guest into tests/guest/out/: Debian's cloud kernel (vmlinuz) and an initramfs
# (initramfs.cpio) holding busybox, Debian's fio with its libraries, the virtio-blk/fw_cfg modules
# and an /init that runs one fio job read from fw_cfg (see guest.py for the host side).
# Needs, on Debian bookworm as root: busybox-static, fio, cpio, apt-get (network to Debian's mirror).
# Skips the rebuild when both outputs exist and are newer than this script.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/out
kernel=$out/vmlinuz
initramfs=$out/initramfs.cpio
# Dependency order: each module's "depends=" must name only modules listed before it (checked below).
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk qemu_fw_cfg)

if [[ -f $kernel && -f $initramfs && $kernel -nt ${BASH_SOURCE[0]} && $initramfs -nt ${BASH_SOURCE[0]} ]]; then
  echo "build.sh: $out is up to date"
  exit 0
fi

for tool in busybox fio cpio apt-get apt-cache dpkg-deb ldd; do
  command -v "$tool" >/dev/null || { echo "build.sh: missing $tool (run .ci/install-deps)" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The kernel: the concrete package the cloud metapackage points at, unpacked, not installed.
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $pkg ]] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
echo "build.sh: kernel package $pkg"
(cd "$tmp" && apt-get download -q "$pkg")
deb=$(echo "$tmp"/"$pkg"_*.deb)
[[ -f $deb ]] || { echo "build.sh: apt-get download $pkg produced no .deb" >&2; exit 1; }
dpkg-deb -x "$deb" "$tmp/kernel"
kver=$(ls "$tmp/kernel/lib/modules")
moddir=$tmp/kernel/lib/modules/$kver

root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,modules}

# Modules, decompressed so busybox insmod loads them whatever the kernel package compressed them with.
loaded=","
for m in "${modules[@]}"; do
  ko=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
  [[ -n $ko ]] || { echo "build.sh: module $m not found in $pkg" >&2; exit 1; }
  case $ko in
    *.xz) xz -dc "$ko" ;;
    *.zst) zstd -qdc "$ko" ;;
    *.gz) gzip -dc "$ko" ;;
    *) cat "$ko" ;;
  esac >"$root/modules/$m.ko"
  deps=$(tr '\0' '\n' <"$root/modules/$m.ko" | sed -n 's/^depends=//p')
  for d in ${deps//,/ }; do
    [[ $loaded == *",$d,"* ]] || { echo "build.sh: $m needs $d, which is not listed before it" >&2; exit 1; }
  done
  loaded+="$m,"
done
printf '%s\n' "${modules[@]}" >"$root/etc/modules.order"

# busybox (static) provides the shell and every tool /init uses; applet links are made at boot.
cp "$(command -v busybox)" "$root/bin/busybox"

# fio and every shared library it loads, at the same paths as on this machine (the dynamic loader
# is the one line of ldd's output without "=>").
cp /usr/bin/fio "$root/bin/fio"
ldd /usr/bin/fio | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 >/proc/sys/kernel/printk   # keep kernel messages out of the JSON on the console
echo "=====GUEST-INIT===== uptime $(cut -d' ' -f1 /proc/uptime)"

finish() {
  echo "FIO-EXIT=$1"
  sync
  poweroff -f
}

for m in $(cat /etc/modules.order); do
  insmod "/modules/$m.ko" || echo "init: insmod $m failed"
done

job=/sys/firmware/qemu_fw_cfg/by_name/opt/ringblk/job/raw
i=0
while [ ! -b /dev/vda ] || [ ! -e "$job" ]; do
  i=$((i + 1))
  if [ "$i" -gt 300 ]; then
    [ -b /dev/vda ] || echo "init: /dev/vda did not appear"
    [ -e "$job" ] || echo "init: no fw_cfg file opt/ringblk/job"
    finish 255
  fi
  sleep 0.1
done
cat "$job" >/tmp/job.fio
echo "=====GUEST-READY===== uptime $(cut -d' ' -f1 /proc/uptime)"

cd /tmp
fio --output-format=json --eta=never --output=/tmp/fio.json /tmp/job.fio 2>/tmp/fio.err
rc=$?
echo "=====FIO-JSON-BEGIN====="
cat /tmp/fio.json
echo "=====FIO-JSON-END====="
sed 's/^/FIO-STDERR: /' /tmp/fio.err
finish "$rc"
EOF
chmod +x "$root/init"

mkdir -p "$out"
cp "$tmp/kernel/boot/vmlinuz-$kver" "$kernel.tmp"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$initramfs.tmp"
mv "$kernel.tmp" "$kernel"
mv "$initramfs.tmp" "$initramfs"
echo "build.sh: $kernel ($kver), $initramfs ($(du -h "$initramfs" | cut -f1))"
