"""`--freeze_encoder`: fine-tune the decoder of a trained VAE without moving its latent space.

The encoder and quant_conv keep their weights bit for bit and the saved model keeps the normalisation it came
with, so latents precomputed with the source model, and diffusion models trained on them, stay valid; only
the decoder (and post_quant_conv) learn, as Stability's ft-MSE / ft-EMA decoders did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from latent_vae import LatentNormalization, load_vae, model_fingerprint

# The config entries the latent normalisation is read from (one per LatentNormalization field).
NORMALIZATION_KEYS = tuple(f.name for f in dataclasses.fields(LatentNormalization))
RECORD_FILE = "frozen_encoder.json"


def encoder_side(vae) -> list[torch.nn.Module]:
    """The modules that make the latent."""
    return [vae.encoder] + ([vae.quant_conv] if getattr(vae, "quant_conv", None) is not None else [])


def encoder_digest(vae) -> str:
    """SHA-256 of the encoder side's weights, bit for bit: equal digests, equal latents."""
    digest = hashlib.sha256()
    for index, module in enumerate(encoder_side(vae)):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{index}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze_encoder(vae) -> str:
    """Turn off gradients of the encoder side; returns its digest, to check the saved model against.

    The caller keeps them out of the optimiser too (no optimiser state for weights that never move); diffusers'
    EMAModel copies parameters without gradients instead of averaging them, so the EMA keeps them exact."""
    for module in encoder_side(vae):
        module.requires_grad_(False)
    return encoder_digest(vae)


def check_frozen_encoder(source: str, exported: Path, digest_before: str, out_dir: Path) -> dict:
    """Compare the saved model's encoder and normalisation with the source's; write OUT_DIR/frozen_encoder.json
    with both fingerprints (latents name the model that made them: the source's fingerprint still identifies
    them after fine-tuning) and raise if the latent space moved."""
    before, after = load_vae(source), load_vae(exported)
    digest_after = encoder_digest(after)
    same_normalization = all(before.config.get(k) == after.config.get(k) for k in NORMALIZATION_KEYS)
    record = {
        "source": str(source), "source_fingerprint": model_fingerprint(before),
        "fingerprint": model_fingerprint(after),
        "encoder_sha256_before": digest_before, "encoder_sha256_after": digest_after,
        "encoder_unchanged": digest_after == digest_before, "normalization_unchanged": same_normalization,
    }
    (Path(out_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2))
    if not (record["encoder_unchanged"] and same_normalization):
        raise RuntimeError(f"freeze_encoder: the saved latent space differs from {source}'s "
                           f"(see {Path(out_dir) / RECORD_FILE})")
    return record
