"""fp16 without overflow: rescale a KL-VAE by powers of two, stage by stage, into fp16's range with the same function.

    layout      the stage graph of an AutoencoderKL: which tensors a GroupNorm shields, what a scale must respect
    rescale     measure the peaks, scale each stage, save the fixed model (`fp16_safe`, `save_fp16_safe`)
"""
