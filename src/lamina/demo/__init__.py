"""The demo: a disk image built from Debian packages that boots from lamina, and its VMs.

home_demo_image(home) / demo_image(cache_dir)   build once, then reuse (image.py)
boot(disk, seed) / boot_async(...) / Vm(...)    run one VM, get its report (vm.py)
"""

from __future__ import annotations

from lamina.demo.image import DemoImage, demo_image, home_demo_image
from lamina.demo.vm import BootReport, Vm, boot, boot_async

__all__ = ["BootReport", "DemoImage", "Vm", "boot", "boot_async", "demo_image", "home_demo_image"]
