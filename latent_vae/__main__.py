"""`python -m latent_vae COMMAND ...`: the `latent-vae` command, also the form launchers start
(`torchrun --nproc_per_node N -m latent_vae precompute ...`, `accelerate launch -m latent_vae precompute ...`)."""

import sys

from .cli import main

sys.exit(main())
