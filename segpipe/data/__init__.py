"""Datasets: reads a raw dataset (MSD or nnU-Net v2 layout, ``dataset.json`` + NIfTI files), validates it
naming each bad file, and writes synthetic phantom datasets (``segpipe synth``). Arrays stay in the files'
voxel order ``(X, Y, Z)``; every later stage reads images through :mod:`segpipe.data.nifti`.
"""
