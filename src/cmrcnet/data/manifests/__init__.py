"""Packaged dataset manifests (YAML), read by :mod:`cmrcnet.data.manifest`."""
