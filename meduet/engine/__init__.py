"""Training and evaluation machinery shared by stages: metrics, loops, tiling."""
