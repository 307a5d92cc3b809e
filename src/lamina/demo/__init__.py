"""The demo: a disk image built from Debian packages that boots from lamina, and its VMs.

showcase.py    ``lamina demo``: the whole shared-image story on embedded defaults
image.py       the bootable demo disk, built once per home (home_demo_image, demo_image)
vm.py          boot the demo image under qemu and read its report (boot, boot_async, Vm)
pxe.py         diskless VMs that boot from the network (PxeVm)
netboot_demo.py  ``lamina demo --pxe``
initramfs.py   the demo machine's userland: a busybox initramfs
kmod.py        kernel modules for that initramfs
userland.py    Debian's nbd-client and its libraries, for that initramfs
tools.py       running the host tools the image is built with
"""

from __future__ import annotations

from lamina.demo.image import DemoImage, demo_image, home_demo_image
from lamina.demo.vm import BootReport, Vm, boot, boot_async

__all__ = ["BootReport", "DemoImage", "Vm", "boot", "boot_async", "demo_image", "home_demo_image"]
