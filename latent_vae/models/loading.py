"""Build, load and save the KL-VAE: diffusers' AutoencoderKL, weights only through safetensors."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils.atomic import atomic_path
from ..utils.errors import ModelLoadError, fp16_fix_advice, one_line
from ..utils.file_boundary import parse_json, read_json, reader_errors, reading
from .presets import PRESETS, VAEPreset, get_preset
from .residual import ResidualAutoencoderKL

# Model classes a saved config may name in `_class_name`; variants register themselves here.
MODEL_CLASSES: dict[str, type[AutoencoderKL]] = {
    "AutoencoderKL": AutoencoderKL, "ResidualAutoencoderKL": ResidualAutoencoderKL,
}

# Metadata key under which a single-file checkpoint carries its diffusers config.
CONFIG_METADATA_KEY = "config"
# Private config entries (diffusers keeps "_" keys through save and load and passes none to __init__), written by
# `latent_vae.fp16.rescale.fp16_safe`: {module name: eps} for GroupNorms whose eps differs from the architecture's, which
# load_vae applies; and {"fingerprint": this model's, "same_function_as": [fingerprints]}, the models it computes
# the same function as (valid while the model's fingerprint is the one recorded: fine-tuning or recalibrating
# the model ends it).
GROUPNORM_EPS_KEY = "_groupnorm_eps"
LINEAGE_KEY = "_lineage"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def build_vae(preset: str | VAEPreset = "f16c16", *, seed: int | None = 0) -> AutoencoderKL:
    """Fresh (untrained) weights for a preset, the same for the same `seed` in every process (so a preset
    name means one model to precompute, load_latents and every rank); None draws from torch's global generator."""
    spec = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if spec.shortcut is None:
            return AutoencoderKL(**spec.diffusers_config())
        return ResidualAutoencoderKL(**spec.diffusers_config(), shortcut=spec.shortcut)


def _class_for(config: dict, where: str = "config") -> type[AutoencoderKL]:
    name = config.get("_class_name", "AutoencoderKL")
    if not isinstance(name, str) or name not in MODEL_CLASSES:
        raise ModelLoadError(f"{where}: _class_name {name!r} is not a KL-VAE this package knows ({', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[name]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config, where: str) -> dict:
    """Check a saved config against what diffusers' AutoencoderKL accepts, before building anything; a bad
    field is a ModelLoadError naming `where` (the file) and the field. Missing fields take diffusers' defaults."""
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: a model config is a JSON object, got a {type(config).__name__}")

    def bad(field: str, wanted: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: {field} must be {wanted}, got {config[field]!r}")

    _class_for(config, where)
    for field in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if field in config and not (_is_int(config[field]) and config[field] > 0):
            raise bad(field, "a positive integer")
    if "sample_size" in config:
        sizes = config["sample_size"] if isinstance(config["sample_size"], list) else [config["sample_size"]]
        if not sizes or not all(_is_int(size) and size > 0 for size in sizes):
            raise bad("sample_size", "a positive integer (or a list of them)")
    widths = config.get("block_out_channels", [64])
    if "block_out_channels" in config and not (
            isinstance(widths, list) and widths and all(_is_int(w) and w > 0 for w in widths)):
        raise bad("block_out_channels", "a non-empty list of positive integers")
    groups = config.get("norm_num_groups", 32)
    if any(w % groups for w in widths):
        raise ModelLoadError(f"{where}: every block_out_channels {widths} must be divisible by norm_num_groups {groups}")
    for field in ("down_block_types", "up_block_types"):
        if field in config:
            types = config[field]
            if not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
                raise bad(field, "a list of block names")
            if len(types) != len(widths):
                raise ModelLoadError(f"{where}: {field} has {len(types)} entries for {len(widths)} block_out_channels")
    if "scaling_factor" in config and not (_is_number(config["scaling_factor"]) and config["scaling_factor"] > 0):
        raise bad("scaling_factor", "a positive number")
    if config.get("shift_factor") is not None and not _is_number(config["shift_factor"]):
        raise bad("shift_factor", "a number or null")
    channels = config.get("latent_channels", 4)
    for field in ("latents_mean", "latents_std"):
        values = config.get(field)
        if values is not None and not (isinstance(values, list) and len(values) == channels
                                       and all(_is_number(v) for v in values)):
            raise bad(field, f"null or a list of {channels} numbers (one per latent channel)")
    if config.get("latents_std") is not None and min(config["latents_std"]) <= 0:
        raise bad("latents_std", "positive")
    for field in ("act_fn", "shortcut"):
        if field in config and not isinstance(config[field], str):
            raise bad(field, "a string")
    for field in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "zero_init"):
        if field in config and not isinstance(config[field], bool):
            raise bad(field, "true or false")
    return config


def _read_config(path: Path) -> dict:
    return validate_config(read_json(path, ModelLoadError, what="model config", expect=None), str(path))


def _check_safetensors(path: Path) -> None:
    """Open the header (which also checks that the file is as long as it says): a truncated, corrupt or
    renamed file is a ModelLoadError naming it, before diffusers sees it."""
    with reading(path, ".safetensors file", ModelLoadError), safe_open(str(path), framework="pt") as f:
        f.keys()


def load_errors() -> tuple[type[BaseException], ...]:
    """What building a model and loading its weights raises for bad files: what any reader raises (the file
    boundary's list), and torch's RuntimeError for weights that do not fit the architecture."""
    return (*reader_errors(), RuntimeError)


def model_folder(path: Path) -> Path | None:
    """The folder holding config.json: the path itself, or a pipeline's `vae/` subfolder."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_vae(source: str | os.PathLike, *, seed: int | None = 0) -> AutoencoderKL:
    """A VAE from a preset name (fresh weights), a diffusers folder, or a single `.safetensors` file.

    Folders may be a model folder (config.json + safetensors) or a pipeline folder with a `vae/`
    subfolder, so pretrained SD/SDXL/SD3/FLUX VAEs load unchanged. Pickled weights are refused.
    """
    source = str(source)
    if source in PRESETS:
        return build_vae(source, seed=seed)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = model_folder(path)
        if folder is None:
            raise ModelLoadError(f"{path} has no config.json (nor vae/config.json): not a diffusers model folder")
        cls = _class_for(_read_config(folder / "config.json"))
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(f"{folder} has no .safetensors weights (pickled weights are not loaded)")
        for file in weights:
            _check_safetensors(file)
        try:
            vae = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        except ModelLoadError:
            raise
        except load_errors() as error:
            raise ModelLoadError(f"{folder}: cannot load the model ({one_line(error)})") from None
        return apply_groupnorm_eps(vae, str(folder / "config.json"))
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
    _check_safetensors(path)
    with reading(path, ".safetensors file", ModelLoadError), safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        # Only a file that carries its config is loaded; an LDM checkpoint's tensors are not read just to refuse it.
        state_dict = {key: f.get_tensor(key) for key in f.keys()} if CONFIG_METADATA_KEY in metadata else {}
    if CONFIG_METADATA_KEY in metadata:
        where = f"{path} (config in its metadata)"
        config = parse_json(metadata[CONFIG_METADATA_KEY], where, ModelLoadError)
        cls = _class_for(validate_config(config, where), where)
        try:
            vae = cls.from_config(config)
            vae.load_state_dict(state_dict, strict=True)
        except load_errors() as error:
            raise ModelLoadError(f"{path}: cannot load the model ({one_line(error)})") from None
        return apply_groupnorm_eps(vae, where)
    # An original (LDM/SD-format) checkpoint: diffusers converts those, but needs a local config.
    raise ModelLoadError(
        f"{path} carries no diffusers config: an original LDM/SD-layout checkpoint? Convert it once with "
        f"`latent-vae convert {path} --out FOLDER` and pass the folder"
    )


def fp16_advice(vae: AutoencoderKL) -> str:
    """What to do when `vae` overflows fp16 (the text lives with the other errors; the model side knows its name
    and whether it was rescaled already)."""
    return fp16_fix_advice(vae.config.get("_name_or_path"), bool(vae.config.get(GROUPNORM_EPS_KEY)))


def apply_groupnorm_eps(vae: AutoencoderKL, where: str = "config") -> AutoencoderKL:
    """Set the GroupNorm eps values recorded under GROUPNORM_EPS_KEY (diffusers builds every one with its
    architecture's eps); a name that is not a GroupNorm or a value that is not a positive number is an error."""
    recorded = vae.config.get(GROUPNORM_EPS_KEY) or {}
    if not isinstance(recorded, dict):
        raise ModelLoadError(f"{where}: {GROUPNORM_EPS_KEY} must be an object of module name -> eps")
    modules = dict(vae.named_modules())
    for name, eps in recorded.items():
        if not isinstance(modules.get(name), torch.nn.GroupNorm):
            raise ModelLoadError(f"{where}: {GROUPNORM_EPS_KEY} names {name!r}, which is not a GroupNorm of this model")
        if not (_is_number(eps) and eps > 0):
            raise ModelLoadError(f"{where}: {GROUPNORM_EPS_KEY}[{name!r}] must be a positive number, got {eps!r}")
        modules[name].eps = float(eps)
    return vae


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
    with atomic_path(path) as tmp:  # never a half-written model under the real name
        save_file(state_dict, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(config, default=list)})
    return path


def model_fingerprint(vae: AutoencoderKL) -> str:
    """A short hash of the architecture, the normalisation and every weight: two models share it only if
    they produce the same latents. Stored with latents so that a latent from another model is caught."""
    digest = hashlib.sha256()
    # The GroupNorm eps values are part of the function; the other private keys (diffusers' own, lineage) are not.
    config = {k: v for k, v in vae.config.items() if not k.startswith("_") or k == GROUPNORM_EPS_KEY}
    digest.update(json.dumps(config, sort_keys=True, default=list).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def function_fingerprints(vae: AutoencoderKL) -> tuple[str, ...]:
    """The fingerprints whose latents this model reads as its own: its own, then those of the models it computes
    the same function as (LINEAGE_KEY, e.g. the source of `latent-vae fp16-fix`) while it is the model recorded."""
    own = model_fingerprint(vae)
    lineage = vae.config.get(LINEAGE_KEY)
    if not isinstance(lineage, dict) or lineage.get("fingerprint") != own:
        return (own,)
    return (own, *(f for f in lineage.get("same_function_as") or [] if isinstance(f, str) and f != own))


def record_lineage(vae: AutoencoderKL, sources: tuple[str, ...]) -> None:
    """Record that `vae` computes the same function as the models with these fingerprints."""
    own = model_fingerprint(vae)
    vae.register_to_config(**{LINEAGE_KEY: {"fingerprint": own, "same_function_as": [f for f in sources if f != own]}})


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
