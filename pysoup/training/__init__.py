"""Averaging during training: the averaged copies a training loop keeps (EMA, SWA, weight ensembles), built on
pysoup.ops.MultiTensorLerp. (Issue 11 fills this room.)"""
