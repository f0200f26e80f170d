"""Build, load and save the KL-VAE: diffusers' AutoencoderKL, weights only through safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

from .presets import PRESETS, VAEPreset, get_preset
from .residual import ResidualAutoencoderKL

# Model classes a saved config may name in `_class_name`; variants register themselves here.
MODEL_CLASSES: dict[str, type[AutoencoderKL]] = {
    "AutoencoderKL": AutoencoderKL, "ResidualAutoencoderKL": ResidualAutoencoderKL,
}

# Metadata key under which a single-file checkpoint carries its diffusers config.
CONFIG_METADATA_KEY = "config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says why and what to do."""


def build_vae(preset: str | VAEPreset = "f16c16", *, seed: int | None = None) -> AutoencoderKL:
    """Fresh (untrained) weights for a preset; `seed` makes them reproducible."""
    spec = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if spec.shortcut is None:
            return AutoencoderKL(**spec.diffusers_config())
        return ResidualAutoencoderKL(**spec.diffusers_config(), shortcut=spec.shortcut)


def _class_for(config: dict) -> type[AutoencoderKL]:
    name = config.get("_class_name", "AutoencoderKL")
    if name not in MODEL_CLASSES:
        raise ModelLoadError(f"model class {name!r} is not a KL-VAE this package knows ({', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[name]


def _model_folder(path: Path) -> Path | None:
    """The folder holding config.json: the path itself, or a pipeline's `vae/` subfolder."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_vae(source: str | os.PathLike, *, seed: int | None = None) -> AutoencoderKL:
    """A VAE from a preset name (fresh weights), a diffusers folder, or a single `.safetensors` file.

    Folders may be a model folder (config.json + safetensors) or a pipeline folder with a `vae/`
    subfolder, so pretrained SD/SDXL/SD3/FLUX VAEs load unchanged. Pickled weights are refused.
    """
    source = str(source)
    if source in PRESETS:
        return build_vae(source, seed=seed)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = _model_folder(path)
        if folder is None:
            raise ModelLoadError(f"{path} has no config.json (nor vae/config.json): not a diffusers model folder")
        config = json.loads((folder / "config.json").read_text())
        cls = _class_for(config)
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} has no .safetensors weights (pickled weights are not loaded)")
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{path}: refusing to unpickle {path.suffix} weights; convert them to .safetensors")
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: expected a .safetensors file or a diffusers model folder")
        return _load_single_file(path)
    raise ModelLoadError(
        f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model folder or .safetensors file"
    )


def _load_single_file(path: Path) -> AutoencoderKL:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state_dict = {key: f.get_tensor(key) for key in f.keys()}
    if CONFIG_METADATA_KEY in metadata:
        config = json.loads(metadata[CONFIG_METADATA_KEY])
        vae = _class_for(config).from_config(config)
        vae.load_state_dict(state_dict, strict=True)
        return vae
    # An original (LDM/SD-format) checkpoint: diffusers converts those, but needs a local config.
    raise ModelLoadError(
        f"{path} carries no diffusers config; load an original SD/LDM checkpoint with "
        "AutoencoderKL.from_single_file(path, config=LOCAL_FOLDER) and save_pretrained it, then pass the folder"
    )


def save_vae(vae: AutoencoderKL, out_dir: str | os.PathLike) -> Path:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors)."""
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_single_file(vae: AutoencoderKL, path: str | os.PathLike) -> Path:
    """One `.safetensors` file with the diffusers config in its metadata (loadable by `load_vae`)."""
    path = Path(path)
    config = {**vae.config, "_class_name": type(vae).__name__}
    state_dict = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_file(state_dict, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(config, default=list)})
    return path


def model_fingerprint(vae: AutoencoderKL) -> str:
    """A short hash of the architecture, the normalisation and every weight: two models share it only if
    they produce the same latents. Stored with latents so that a latent from another model is caught."""
    digest = hashlib.sha256()
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=list).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def codec_flops(vae: AutoencoderKL, height: int, width: int) -> tuple[int, int]:
    """FLOPs (multiply-adds x 2, convolutions and matmuls) of encoding and of decoding one image of this
    size, counted on a weightless copy on the meta device: free even where the real pass would not fit."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        shadow = type(vae).from_config(vae.config)
        pixels = torch.empty(1, vae.config.in_channels, height, width)
        with FlopCounterMode(display=False) as counter:
            latents = shadow.encode(pixels).latent_dist.mode()
        encode = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            shadow.decode(latents)
        return encode, counter.get_total_flops()
