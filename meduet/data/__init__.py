"""Data: the demo-data generator (``phantom`` = content, ``scanner`` = site styles,
``demo`` = MSD writer) and the datasets and caches that feed training.

Submodules are imported explicitly (``from meduet.data import phantom``): importing this
package pulls in nothing heavy.
"""
