"""Scale-out on PyTorch's own machinery: torchrun/DDP process groups, sharding cases over ranks, one
training process per GPU. Imports only :mod:`segpipe.core`.
"""
