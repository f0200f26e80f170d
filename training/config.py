"""The training run's configuration: one typed dataclass, merged from defaults <- JSON file <- `--field value`."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from latent_vae.images.reading import DEFAULT_MAX_PIXELS
from latent_vae.models.presets import PRESETS
from latent_vae.utils import option_values as values
from latent_vae.utils.file_boundary import read_json

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the LDM kl-f16 recipe where LDM has one (docs/training.md)."""

    # -- model and data
    model: str = "f16c16"  # a preset name (fresh weights) or a diffusers folder / .safetensors to fine-tune
    # Train the decoder (and post_quant_conv) only: the encoder, quant_conv and the saved normalisation stay
    # bit-identical, so latents already precomputed and diffusion models trained on them stay valid.
    freeze_encoder: bool = False
    data: str = ""  # image folder (recursive), save_to_disk folder, .parquet or .arrow file (or a folder of them)
    image_column: str = "image"  # for datasets
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (and counted) unread: decompression bombs; 0: no limit
    split: str = ""  # for a saved DatasetDict: which split (empty: train, or the only one)
    resolution: int = 256  # training crop side; the network is fully convolutional, so 1024 models train on crops
    # "ldm": LDM's autoencoder crops: a random square of a fraction in [crop_min, 1] of the short side, area-resized
    # (PIL's box filter, as LDM's cv2 INTER_AREA) to `resolution`. "native": a resolution-sized patch at the image's
    # own scale after a random rescale in [min_scale, 1]: for data already resized to about the training size.
    crop_policy: Literal["ldm", "native"] = "ldm"
    crop_min: float = 0.5  # "ldm": smallest crop side, as a fraction of the short side (LDM's min_crop_f)
    min_scale: float = 1.0  # "native": images are first resized by a random factor in [min_scale, 1] (never below the crop)
    random_flip: bool = True
    num_workers: int = 2
    validation_data: str = ""  # image folder or dataset; empty: images held out of --data (validation_holdout)
    # Without validation_data: this many images of --data, a fixed choice (the same for every seed), are never
    # trained on and are the validation set (listed in the log and in each checkpoint's trainer_state.json).
    # 0: no hold-out; validation then scores the first training images, which measures fit, not generalisation.
    validation_holdout: int = 4
    num_validation_images: int = 4  # validated (and drawn) images, at most the held-out ones
    validation_resolution: int = 256
    # The size the model is used at (0: not measured): validation also scores the posterior (mean, one sample, KL)
    # of num_use_images images at this size, where a posterior learnt on small crops can fail unseen.
    use_resolution: int = 1024
    num_use_images: int = 2
    validate_every: int = 500  # steps; 0 disables (a last validation still runs at the end)
    calibration_images: int = 64  # crops measured for the saved latent normalisation

    # -- optimisation
    seed: int = 0
    torch_threads: int = 0  # CPU threads per process; 0: torch's default (on a shared CPU, 1 often beats fighting for cores)
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 100_000  # optimiser steps
    max_minutes: float = 0.0  # wall-clock budget (0: none); all ranks stop at the same step
    learning_rate: float = 1e-4
    adam_beta1: float = 0.5  # LDM's (0.5, 0.9): a GAN-friendly Adam
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"  # any name diffusers' get_scheduler knows
    lr_warmup_steps: int = 1000
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; master weights stay fp32
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 20  # this many NaN/inf losses in a row stop the run

    # -- EMA (diffusers' EMAModel); the saved model carries the EMA weights
    use_ema: bool = True
    ema_decay: float = 0.9999  # the ceiling; with warm-up the decay starts low so short runs still average
    ema_warmup: bool = True
    ema_power: float = 2 / 3

    # -- losses (training/losses.py)
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # "learned": the encoder predicts the posterior's log-variance (LDM). It is only trained at the crop size, and
    # can run to logvar_max at larger sizes, where sampling then drowns the latent (docs/training.md).
    # "fixed": the log-variance is the constant fixed_logvar everywhere, by construction (zero weights and a
    # constant bias in its rows of quant_conv, which training leaves as they are); still a plain AutoencoderKL.
    # A pretrained model's own log-variance is replaced at the start; with freeze_encoder it is kept as it is.
    posterior_logvar: Literal["learned", "fixed"] = "learned"
    fixed_logvar: float = -10.0  # posterior std exp(-5) = 0.0067, as a shortcut model's zero-init posterior
    lpips_weight: float = 1.0
    lpips_weights: str = ""  # local .safetensors (python -m training.lpips --help); empty: the default cache file
    sharpness_loss: Literal["fft", "ssim"] = "fft"
    sharpness_weight: float = 0.0
    # Skorokhodov et al. 2025: decode latents downsampled by each factor, match the images downsampled alike, with
    # the pixel loss (its units; 1 counts as much as the full-size reconstruction). It reshapes the latent space
    # (fewer high frequencies), so it needs a trainable encoder; factors leave latents of at least 2 pixels a side.
    scale_equivariance_weight: float = 0.0
    scale_equivariance_factors: tuple[int, ...] = (2, 4)
    disc_weight: float = 0.5  # LDM's disc_weight: multiplies the adaptive weight
    disc_start: int = 50_001  # optimiser step at which the discriminator and its loss switch on
    disc_learning_rate: float = 1e-4
    disc_layers: int = 3
    disc_channels: int = 64
    # LDM's clamp of the adaptive weight, in LDM's units: the gradient-norm ratio is computed for the reconstruction
    # loss summed over each image's pixel values, as LDM's, and divided by that count for our mean-reduced losses
    # (training/losses.py: adaptive_weight), so the GAN term has LDM's strength at any resolution and batch.
    adaptive_weight_max: float = 1e4

    # -- output
    output_dir: str = "runs/vae"
    checkpoint_every: int = 1000  # steps; 0: only at the end
    keep_checkpoints: int = 3
    resume: str = ""  # "latest", or a checkpoint folder
    log_every: int = 10
    report_to: str = "tensorboard"  # an Accelerate tracker name, or "none"

    def validate(self) -> None:
        """Bad values fail at start, not hours into a run (numbers by the command line's parsers: finite, in range)."""
        values.check_fields(self, NUMBER_RULES)
        if not self.data:
            raise ValueError("no training data: set --data to an image folder or a datasets folder/file")
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be l1 or l2, got {self.reconstruction_loss!r}")
        if self.sharpness_loss not in ("fft", "ssim"):
            raise ValueError(f"sharpness_loss must be fft or ssim, got {self.sharpness_loss!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "resolution", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if self.scale_equivariance_weight > 0:
            if self.freeze_encoder:
                raise ValueError("scale_equivariance_weight reshapes the latent space through the encoder, which "
                                 "freeze_encoder keeps as it is: use one or the other")
            if not self.scale_equivariance_factors or min(self.scale_equivariance_factors) < 2:
                raise ValueError(f"scale_equivariance_factors must be integers of at least 2, got "
                                 f"{list(self.scale_equivariance_factors)}")
        if self.freeze_encoder and self.model in PRESETS:
            raise ValueError(f"freeze_encoder keeps the encoder as it is, but {self.model!r} is a preset (fresh, random "
                             "weights): give --model a trained or converted model folder")
        if self.crop_policy not in ("ldm", "native"):
            raise ValueError(f"crop_policy must be ldm or native, got {self.crop_policy!r}")
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if self.posterior_logvar not in ("learned", "fixed"):
            raise ValueError(f"posterior_logvar must be learned or fixed, got {self.posterior_logvar!r}")
        if self.validation_holdout < 0:
            raise ValueError(f"validation_holdout must be 0 or more, got {self.validation_holdout}")


_UNIT = values.Real(0.0, inclusive=True, high=1.0, wanted="a finite number from 0 to 1")
_FINITE = values.Real(-1e300, inclusive=True, wanted="a finite number")
# The range of every number of the config (crop_min and min_scale are checked in validate, with their message).
NUMBER_RULES = {
    **dict.fromkeys(("batch_size", "gradient_accumulation_steps", "max_steps", "keep_checkpoints",
                     "num_validation_images", "num_use_images", "calibration_images", "log_every",
                     "max_nonfinite_steps", "disc_layers", "disc_channels"), values.positive_int),
    **dict.fromkeys(("resolution", "validation_resolution"), values.image_side),
    **dict.fromkeys(("num_workers", "validation_holdout", "validate_every", "checkpoint_every", "torch_threads",
                     "lr_warmup_steps", "disc_start", "max_pixels", "use_resolution"), values.non_negative_int),
    "seed": values.any_int,
    **dict.fromkeys(("learning_rate", "disc_learning_rate", "adaptive_weight_max", "ema_power"), values.positive_float),
    **dict.fromkeys(("max_minutes", "weight_decay", "max_grad_norm", "kl_weight", "lpips_weight", "sharpness_weight",
                     "disc_weight", "scale_equivariance_weight"), values.non_negative_float),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "ema_decay"), _UNIT),
    **dict.fromkeys(("logvar_min", "logvar_max", "fixed_logvar"), _FINITE),
}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(name: str, kind, value):
    """A JSON or command-line value -> the field's type; a wrong type is a ValueError naming the field."""
    if typing.get_origin(kind) is Literal:
        kind = type(typing.get_args(kind)[0])
    if typing.get_origin(kind) is tuple:  # of ints: a JSON list, or "2,4" on the command line
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name} must be a list of integers, got {value!r}")
        return tuple(_coerce(name, int, item.strip() if isinstance(item, str) else item) for item in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None


def merge(config: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of `config` with `overrides` applied; unknown keys raise ValueError naming them."""
    types_ = _field_types()
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(f"unknown config option(s): {', '.join(unknown)} (see training/config.py for the list)")
    values = asdict(config)
    for name, value in overrides.items():
        values[name] = _coerce(name, types_[name], value)
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- the JSON file at `path` (a bare name looks in training/configs/) <- `overrides`."""
    config = TrainConfig()
    if path:
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path
        if not path.exists() and (CONFIG_DIR / f"{path}.json").exists():
            path = CONFIG_DIR / f"{path}.json"
        file_values = read_json(path, what="training config")  # a malformed file: one line naming it
        file_values.pop("_comment", None)
        try:
            config = merge(config, file_values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return merge(config, overrides or {})


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """`--config FILE` plus `--field value` for every field; argparse rejects unknown options by name."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train_vae", allow_abbrev=False, description="Train a KL-VAE (see training/config.py for every field)."
    )
    parser.add_argument("--config", default=None, help="JSON file, or a name in training/configs/")
    for name, kind in _field_types().items():
        # Parsed as strings and coerced by `merge`, so that file and command line share one set of rules.
        # A bare boolean flag (`--freeze_encoder`) means true.
        flag = {"nargs": "?", "const": "true"} if kind is bool else {}
        parser.add_argument(f"--{name}", default=None, metavar=_type_name(kind), **flag)
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    return load_config(path, {k: v for k, v in args.items() if v is not None})


def _type_name(kind) -> str:
    if typing.get_origin(kind) is Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if typing.get_origin(kind) is tuple:
        return "INT,INT,..."
    return getattr(kind, "__name__", str(kind)).upper()


def to_dict(config: TrainConfig) -> dict:
    return asdict(config)


def to_hparams(config: TrainConfig) -> dict:
    """The config as tracker hyperparameters: TensorBoard takes numbers, text and bools only, so a list such as
    `scale_equivariance_factors` travels as its JSON text."""
    plain = (int, float, str, bool, type(None))
    return {k: v if isinstance(v, plain) else json.dumps(v) for k, v in to_dict(config).items()}

