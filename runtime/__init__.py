"""The segmentation runtime: volume I/O, preprocessing, metrics and inference backends.

This package is the leaf of the project: it never imports torch, so it installs and runs
on a Jetson or a CPU-only machine.
"""

__version__ = "0.1.0"
