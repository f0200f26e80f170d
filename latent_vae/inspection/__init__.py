"""`latent-vae inspect`: what a latent space looks like and how well it will diffuse.

    measures    the measures: spectra, high-frequency share, per-channel KL, scale equivariance, interpolation
    report      run the measures on a codec and its images (`inspect_codec`), report.json
    html        the self-contained HTML page
    svg_plots   the small inline SVG plots of the page
"""
