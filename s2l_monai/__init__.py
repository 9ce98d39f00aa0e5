"""Scribble2Label (Lee & Jeong, MICCAI 2020) on MONAI: scribble-supervised cell segmentation."""

from __future__ import annotations

__version__ = "0.1.0"
