"""Block images: manifests of fixed-size chunks, import, export, random-access reads."""

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
