"""MeDUET: disentangled unified pretraining for 3D medical image synthesis and analysis.

The package is organised by pipeline stage (see ``meduet.stages``); each stage is one
plain function ``run(cfg, paths) -> StageResult`` reached from the CLI, DVC and Prefect.

Shape vocabulary used in docstrings and comments throughout the code base:

- ``B`` batch, ``C`` channels
- ``D, H, W`` voxel grid of a harmonized volume (array axes; RAS world axes z, y, x)
- ``d, h, w`` latent grid (``D/4, H/4, W/4`` for the KL-VAE)
- ``N`` tokens, ``E`` embedding width, ``S`` style width, ``K`` number of sites (domains)

Arrays read from SimpleITK are ``(D, H, W)`` = ``(z, y, x)``; SimpleITK sizes, spacings
and origins are ``(x, y, z)``.
"""

__version__ = "0.1.0"
