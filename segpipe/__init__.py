"""segpipe: a segmentation pipeline for 3D medical volumes (NIfTI in, NIfTI out).

Stages hand off through files: dataset -> fingerprint -> plans -> preprocessed cases ->
checkpoints -> predictions -> reports. Each module implements one stage or one building block.
"""

__version__ = "0.1.0"
