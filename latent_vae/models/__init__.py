"""The model side: which architectures exist, how a VAE is built, loaded and saved, and where one comes from.

    presets     named architectures (`VAEPreset`, `PRESETS`)
    loading     build, load and save a VAE (diffusers folders and single files, safetensors only); fingerprints
    normalization  the constants in a model's config that give a diffusion model unit-variance latents (`calibrate`)
    residual    `ResidualAutoencoderKL`: the shortcut models that start from a thumbnail or block code
    convert     LDM-layout checkpoints -> diffusers folders, through a pickle reader that runs no code
"""
