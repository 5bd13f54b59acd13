"""The run folder's formats: checkpoints (weights, optimizer and RNG state, the plans copy), cycle snapshots
and SWA weights, the per-epoch log and its plot. Training writes them; inference, ensembles and reports read
them.
"""
