"""The VAE training program: `accelerate launch -m training.train_vae --config FILE`."""
