"""Planning: reads the raw dataset and writes ``WORK/fingerprint.json`` (spacings, shapes, intensities),
``WORK/plans.json`` (typed plans per configuration: target spacing, normalization, patch, batch, network
topology) and ``WORK/splits.json`` (the cross-validation folds).
"""
