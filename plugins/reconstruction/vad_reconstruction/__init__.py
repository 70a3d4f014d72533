"""Building blocks shared by vad's reconstruction detectors (DRAEM, DSR, the autoencoders, f-AnoGAN).

A library: it registers nothing. ``losses`` holds SSIM, the focal loss and the mean-filtered
maximum image score; ``patches`` reconstructs images patch by patch and averages the overlaps.
"""
