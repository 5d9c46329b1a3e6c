"""Harmonization: bring multi-center scans onto one orientation, grid and intensity scale."""
