"""Data helpers: automatic scribbles from full masks and a synthetic fluorescence-nuclei generator."""

from __future__ import annotations
