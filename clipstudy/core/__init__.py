"""The mathematics of the study: tensors in, tensors out.

Losses, the dual encoder, optimizers, retrieval and zero-shot metrics, training
diagnostics, gathering across processes and the precision policy. Nothing here
reads files of the study or knows about runs, sweeps or the command line.
"""
