"""Training-time augmentation: draws random parameters (plain, replayable records), applies them per
sample (the MONAI reference) or to a whole batch on any device, and corrupts the cascade's one-hot stage-1
channels. Reads and writes no files.
"""
