"""Data: readers for real formats, patches, gene preprocessing, splits."""

from cmrcnet.data.image import ArrayImage, SlideImage
from cmrcnet.data.sample import Sample

__all__ = ["ArrayImage", "SlideImage", "Sample"]
