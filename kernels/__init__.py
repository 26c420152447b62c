"""Compute kernels: saliency rasterization/blur (Numba) and the fused SAT perturbation.

This package imports nothing else of satpipe; import submodules directly
(`from kernels.raster import ...`) so that importing one does not compile or import the others."""
