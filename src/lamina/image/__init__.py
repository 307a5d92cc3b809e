"""Block images: manifests of fixed-size chunks, import, export, random-access reads.

manifest.py   a block image as a table of fixed-size chunk ids (pure)
importer.py   import a disk image file into the chunk store as a manifest
qemu.py       qemu-img, the adapter for every format but raw
exporter.py   write an image version out as sparse raw or qcow2
reader.py     byte ranges of an image version through a shared chunk cache
device.py     an image version as a read-only block device
profile.py    boot profiles: the chunks a boot reads first, in order (format, window)
"""

from lamina.image.exporter import export_image
from lamina.image.importer import Imported, ImportStats, detect_format, import_file
from lamina.image.manifest import Manifest
from lamina.image.reader import ImageReader

__all__ = [
    "ImageReader",
    "ImportStats",
    "Imported",
    "Manifest",
    "detect_format",
    "export_image",
    "import_file",
]
