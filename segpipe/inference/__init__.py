"""Inference: reads run folders (or saved probabilities) and NIfTI images and writes predictions: sliding
windows with Gaussian weights and mirroring, fold/snapshot ensembles, resampling back to the input grid, the
postprocessing decision applied, a manifest so that a half-done folder resumes.
"""
