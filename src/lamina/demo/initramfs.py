"""The demo machine's whole userland: a busybox initramfs whose /init reports and stops.

The init finds its two disks, reads the NoCloud seed like cloud-init would (label
``cidata``), sets the hostname, prints one line to the serial console, leaves a marker on
the root file system (so a reboot shows whether the machine's writes survived) and
powers off. The disks are either attached by the hypervisor (virtio, found by label) or,
when the kernel command line carries ``nbdroot=`` (a network boot), attached by the
machine itself: DHCP on the interface that booted (``BOOTIF=``), then Debian's
``nbd-client`` and the kernel's ``nbd`` driver for ``machine/NAME`` (``/dev/nbd0``) and
``lamina.seed=`` (``/dev/nbd1``), over TLS with ``lamina.tls=1``; at power-off both are
disconnected cleanly (NBD_CMD_DISC), as qemu does for its own disks.

``lamina.hold=SECONDS`` keeps the machine up that long after its report, reading its
root again every second (``lamina-hold`` lines), to watch a disk ride out a link loss.

Given a third disk labelled ``lmscript`` (an ISO with ``run.sh``), the init sources that
script with the root file system mounted at /mnt/root before it powers off: tests drive a
running machine that way (write, wait on the console for the go-ahead, read back).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from lamina.identity.seed import MACHINE_ID_PATH, SEED_LABEL
from lamina.netboot import cpio
from lamina.netboot.tlsfiles import CA, CERT, KEY, TLS_DIR

ROOT_LABEL = "lamina-root"
MARKER = "var/lib/lamina-demo/marker"
# What the init needs from the kernel: virtio disks, the root file system, the seed's;
# for a network boot the virtio NIC and the NBD client driver.
MODULES = ("virtio_pci", "virtio_blk", "ext4", "isofs", "virtio_net", "nbd")
BOOT_PREFIX = "lamina-boot "
HOLD_PREFIX = "lamina-hold "
SCRIPT_LABEL = "lmscript"
_ID_PATH_RE = MACHINE_ID_PATH.replace("/", "\\/")  # inside an awk /regex/

INIT = r"""#!/bin/sh
# lamina demo init: find the disks, read the seed, report on the console, leave a marker,
# power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
fail() { echo "@BOOT@error=$*"; sync; poweroff -f; }
for m in $(cat /lib/modules/load-order); do
    case $m in
        nbd) insmod /lib/modules/$m.ko max_part=16 || fail "insmod-$m" ;;
        *) insmod /lib/modules/$m.ko || fail "insmod-$m" ;;
    esac
done
for word in $(cat /proc/cmdline); do
    case "$word" in
        nbdroot=*) nbdroot=${word#nbdroot=} ;;
        root=/dev/nbd*) nbddev=${word#root=} ;;
        lamina.seed=*) nbdseed=${word#lamina.seed=} ;;
        lamina.tls=1) tls=1 ;;
        lamina.hold=*) hold=${word#lamina.hold=} ;;
        BOOTIF=*) bootif=${word#BOOTIF=} ;;
    esac
done
# up to 10 s for a device the kernel probes asynchronously
settle() { i=0; until "$@"; do i=$((i + 1)); [ $i -gt 100 ] && return 1; usleep 100000; done; }
nic() {
    want=$(echo "${bootif#01-}" | tr - :)
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] && continue
        first=${first:-$name}
        [ "$(cat "$dev/address")" = "$want" ] && echo "$name" && return 0
    done
    [ -z "$bootif" ] && [ -n "$first" ] && echo "$first"
}
attach() { # attach HOST:PORT/EXPORT DEVICE
    host=${1%%:*}; rest=${1#*:}; port=${rest%%/*}; name=${rest#*/}
    set -- "$host" -N "$name" "$port" "$2"
    [ -n "$tls" ] && set -- "$@" -certfile /@TLS@/@CERT@ -keyfile /@TLS@/@KEY@ \
        -cacertfile /@TLS@/@CA@
    nbd-client "$@" >/tmp/nbd.log 2>&1 || fail "nbd-client-$name:$(tail -n 1 /tmp/nbd.log | tr ' ' -)"
}
if [ -n "$nbdroot" ]; then
    settle nic >/dev/null || fail "no-network-interface"
    iface=$(nic)
    ip link set lo up && ip link set "$iface" up || fail "link-$iface"
    udhcpc -i "$iface" -n -q -t 5 -s /bin/udhcpc.script >/dev/null 2>&1 || fail "no-dhcp-on-$iface"
    attach "$nbdroot" /dev/nbd0
    [ -n "$nbdseed" ] && attach "$nbdseed" /dev/nbd1
    # the kernel reads the partition table at the disk's first open
    dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 2>/dev/null
    root=${nbddev:-/dev/nbd0p1}
    settle test -b "$root" || fail "no-$root"
    seed=/dev/nbd1
else
    # virtio disks are probed asynchronously: wait up to 10 s for both.
    settle eval 'root=$(findfs LABEL=@ROOT@) && seed=$(findfs LABEL=@SEED@)' 2>/dev/null \
        || fail "disks-not-found"
fi
mkdir -p /mnt/root /mnt/seed
mount -t iso9660 -o ro "$seed" /mnt/seed || fail "cannot-mount-seed"
mount -t ext4 "$root" /mnt/root || fail "cannot-mount-root"
field() { sed -n "s/^$1: *//p" "$2" | head -n 1 | tr -d "\"'"; }
h=$(field hostname /mnt/seed/user-data)
[ -n "$h" ] || h=$(field local-hostname /mnt/seed/meta-data)
[ -n "$h" ] || fail "no-hostname-in-seed"
id=$(awk '/path: @IDRE@/ {f = 1}
          f && match($0, /[0-9a-f]{32}/) {print substr($0, RSTART, RLENGTH); exit}' \
     /mnt/seed/user-data)
hostname "$h"
m=/mnt/root/@MARKER@
if [ -e "$m" ]; then marker=present; else marker=absent; fi
echo "@BOOT@hostname=$(hostname) machine-id=${id:-none} marker=$marker"
mkdir -p "${m%/*}" && echo "$h" > "$m" || fail "cannot-write-marker"
if [ -n "$hold" ]; then
    n=0
    end=$(( ${hold} + $(cut -d. -f1 /proc/uptime) ))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        echo 3 > /proc/sys/vm/drop_caches
        if sum=$(md5sum /mnt/root/boot/vmlinuz 2>/dev/null) && echo "$n" > "$m.hold" && sync; then
            echo "@HOLD@n=$n ok=${sum%% *} t=$(cut -d' ' -f1 /proc/uptime)"
        else
            echo "@HOLD@n=$n failed t=$(cut -d' ' -f1 /proc/uptime)"
        fi
        n=$((n + 1))
        sleep 1
    done
fi
# A third virtio disk (device id 2: block) is the script disk: wait for it as for the others.
if [ "$(cat /sys/bus/virtio/devices/*/device | grep -c 0x0002)" -gt 2 ]; then
    i=0
    until s=$(findfs LABEL=@SCRIPT@); do
        i=$((i + 1)); [ $i -gt 100 ] && fail "script-disk-not-found"; usleep 100000
    done 2>/dev/null
    mkdir -p /mnt/script && mount -t iso9660 -o ro "$s" /mnt/script || fail "cannot-mount-script"
    . /mnt/script/run.sh
    umount /mnt/script
fi
umount /mnt/root
umount /mnt/seed
sync
if [ -n "$nbdroot" ]; then
    # a clean disconnect (NBD_CMD_DISC) tells the server this boot is over
    [ -n "$nbdseed" ] && nbd-client -d /dev/nbd1 >/dev/null 2>&1
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
fi
poweroff -f
"""
for _marker, _value in (
    ("@BOOT@", BOOT_PREFIX),
    ("@HOLD@", HOLD_PREFIX),
    ("@TLS@", TLS_DIR),
    ("@CERT@", CERT),
    ("@KEY@", KEY),
    ("@CA@", CA),
    ("@ROOT@", ROOT_LABEL),
    ("@SEED@", SEED_LABEL),
    ("@IDRE@", _ID_PATH_RE),
    ("@MARKER@", MARKER),
    ("@SCRIPT@", SCRIPT_LABEL),
):
    INIT = INIT.replace(_marker, _value)

# busybox udhcpc hands the lease to a script; this one configures the interface.
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        ;;
esac
exit 0
"""


def build_initramfs(
    busybox: bytes, modules: list[Path], userland: dict[str, bytes] | None = None
) -> bytes:
    """The gzip'd cpio of busybox, the init, ``modules`` (in load order) and ``userland``
    (path in the initramfs -> bytes: nbd-client and its libraries).

    gzip -9 is the cheapest format to unpack under TCG, where the kernel's decompressor
    runs emulated (zstd -19 measured no faster here: both 4.4-4.8 s to the init).
    """
    names = [m.name.removesuffix(".ko") for m in modules]
    extra = userland or {}
    folders = {str(Path(p).parent) for p in extra} - {"."}
    entries = [
        *(
            cpio.directory(d)
            for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules", "tmp")
        ),
        *(cpio.directory(d) for d in sorted(_with_parents(folders)) if d not in ("bin", "lib")),
        cpio.char_device("dev/console", 5, 1),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", INIT.encode(), 0o755),
        cpio.file("bin/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755),
        cpio.file("lib/modules/load-order", ("\n".join(names) + "\n").encode()),
        *(cpio.file(f"lib/modules/{m.name}", m.read_bytes()) for m in modules),
        *(cpio.file(path, data, 0o755) for path, data in sorted(extra.items())),
    ]
    return gzip.compress(cpio.archive(entries), compresslevel=9, mtime=0)


def _with_parents(folders: set[str]) -> set[str]:
    out = set()
    for folder in folders:
        parts = Path(folder).parts
        out |= {str(Path(*parts[: i + 1])) for i in range(len(parts))}
    return out
