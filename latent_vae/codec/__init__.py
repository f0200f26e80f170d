"""The coding side: images in, normalised latents out, and back.

    latent_codec    `LatentCodec`: encode and decode with the model's normalisation, any input, any size
    posterior       how far a posterior sample lies from its mean, against the latents' spread
    tiling/         exact tiles: the same function as the whole image, in bounded memory
"""
