"""Converters from real downloads (CC3M, COCO Karpathy, ImageNet) into the study's formats."""
