"""Scribble2Label for MONAI Label: datastore checks, scribble mapping, inference and training tasks.

The modules that do not need MONAI Label (:mod:`lib.scribble_labels`, :mod:`lib.image_io`) import in the project's
main environment too, so their unit tests run there.
"""
