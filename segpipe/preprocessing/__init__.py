"""Preprocessing: reads the raw images and ``WORK/plans.json`` and writes
``WORK/preprocessed/<config>/CASE.npy`` (crop to non-zero, normalize, resample to the target spacing); also
the cascade's stage-1 inputs (``WORK/3d_cascade_fullres/previous_stage/``), which training and inference
both read.
"""
