"""The demo machine's whole userland: a busybox initramfs whose /init reports and stops.

The init reads the NoCloud seed like cloud-init would (label ``cidata``), sets the
hostname, prints one line to the serial console, leaves a marker on the root file system
(so a reboot shows whether the machine's writes survived) and powers off.

Given a third disk labelled ``lmscript`` (an ISO with ``run.sh``), the init sources that
script with the root file system mounted at /mnt/root before it powers off: tests drive a
running machine that way (write, wait on the console for the go-ahead, read back).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from lamina.demo import cpio
from lamina.identity.seed import MACHINE_ID_PATH, SEED_LABEL

ROOT_LABEL = "lamina-root"
MARKER = "var/lib/lamina-demo/marker"
# What the init needs from the kernel: virtio disks, the root file system, the seed's.
MODULES = ("virtio_pci", "virtio_blk", "ext4", "isofs")
BOOT_PREFIX = "lamina-boot "
SCRIPT_LABEL = "lmscript"
_ID_PATH_RE = MACHINE_ID_PATH.replace("/", "\\/")  # inside an awk /regex/

INIT = rf"""#!/bin/sh
# lamina demo init: read the seed, report on the console, leave a marker, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
fail() {{ echo "{BOOT_PREFIX}error=$*"; sync; poweroff -f; }}
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m.ko || fail "insmod-$m"; done
# virtio disks are probed asynchronously: wait up to 10 s for both.
i=0
until root=$(findfs LABEL={ROOT_LABEL}) && seed=$(findfs LABEL={SEED_LABEL}); do
    i=$((i + 1)); [ $i -gt 100 ] && fail "disks-not-found"; usleep 100000
done 2>/dev/null
mkdir -p /mnt/root /mnt/seed
mount -t iso9660 -o ro "$seed" /mnt/seed || fail "cannot-mount-seed"
mount -t ext4 "$root" /mnt/root || fail "cannot-mount-root"
field() {{ sed -n "s/^$1: *//p" "$2" | head -n 1 | tr -d "\"'"; }}
h=$(field hostname /mnt/seed/user-data)
[ -n "$h" ] || h=$(field local-hostname /mnt/seed/meta-data)
[ -n "$h" ] || fail "no-hostname-in-seed"
id=$(awk '/path: {_ID_PATH_RE}/ {{f = 1}}
          f && match($0, /[0-9a-f]{{32}}/) {{print substr($0, RSTART, RLENGTH); exit}}' \
     /mnt/seed/user-data)
hostname "$h"
m=/mnt/root/{MARKER}
if [ -e "$m" ]; then marker=present; else marker=absent; fi
echo "{BOOT_PREFIX}hostname=$(hostname) machine-id=${{id:-none}} marker=$marker"
mkdir -p "${{m%/*}}" && echo "$h" > "$m" || fail "cannot-write-marker"
# A third virtio disk (device id 2: block) is the script disk: wait for it as for the others.
if [ "$(cat /sys/bus/virtio/devices/*/device | grep -c 0x0002)" -gt 2 ]; then
    i=0
    until s=$(findfs LABEL={SCRIPT_LABEL}); do
        i=$((i + 1)); [ $i -gt 100 ] && fail "script-disk-not-found"; usleep 100000
    done 2>/dev/null
    mkdir -p /mnt/script && mount -t iso9660 -o ro "$s" /mnt/script || fail "cannot-mount-script"
    . /mnt/script/run.sh
    umount /mnt/script
fi
umount /mnt/root
umount /mnt/seed
sync
poweroff -f
"""


def build_initramfs(busybox: bytes, modules: list[Path]) -> bytes:
    """The gzip'd cpio of busybox, the init and ``modules`` (in load order).

    gzip -9 halves the archive (2.4 -> 1.1 MiB) and is the cheapest format to unpack
    under TCG, where the kernel's decompressor runs emulated; xz would save 0.2 MiB more.
    """
    names = [m.name.removesuffix(".ko") for m in modules]
    entries = [
        *(cpio.directory(d) for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", INIT.encode(), 0o755),
        cpio.file("lib/modules/load-order", ("\n".join(names) + "\n").encode()),
        *(cpio.file(f"lib/modules/{m.name}", m.read_bytes()) for m in modules),
    ]
    return gzip.compress(cpio.archive(entries), compresslevel=9, mtime=0)
