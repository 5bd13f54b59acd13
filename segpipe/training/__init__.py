"""Training: reads preprocessed cases, plans and splits, and writes the run folder
``WORK/<config>/fold_<k>/`` (checkpoints, snapshots, ``log.csv``, ``progress.png``) and, at the end, the
fold's out-of-fold predictions (``validation/``) through the inference path.
"""
