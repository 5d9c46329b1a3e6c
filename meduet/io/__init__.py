"""Input/output helpers: atomic writes, medical image files, manifests, remote storage."""
