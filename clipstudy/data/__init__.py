"""Data sets on disk and in memory: formats, images, augmentation, zero-shot sets,
the embedded demo generator and the converters from real downloads (``prepare``).
"""
