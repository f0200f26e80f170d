"""Images: the one reader, conversions between PIL, numpy and tensors, fidelity metrics and pictures.

    reading     read and check an image, convert it, crop it, find the images of a folder
    metrics     PSNR, SSIM and the bicubic baseline at equal values
    figures     pictures for people: error maps, captioned strips, grids
"""
