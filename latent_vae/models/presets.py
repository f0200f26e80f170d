"""Named KL-VAE architectures: one typed dataclass per preset, turned into diffusers' AutoencoderKL config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def downsampling_factor(block_out_channels) -> int:
    """Pixels per latent side: every level but the last halves the resolution (diffusers pipelines derive
    `vae_scale_factor` the same way)."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass(frozen=True)
class VAEPreset:
    """The architecture of a KL-VAE; everything else (weights, normalisation) lives in the model."""

    block_out_channels: tuple[int, ...]
    latent_channels: int
    layers_per_block: int = 2
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    mid_block_add_attention: bool = True
    shortcut: str | None = None  # None: plain AutoencoderKL; "global", "stage" or "thumbnail": ResidualAutoencoderKL
    description: str = field(default="", compare=False)

    @property
    def downsampling_factor(self) -> int:
        return downsampling_factor(self.block_out_channels)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of this size (sizes are padded up to the factor)."""
        f = self.downsampling_factor
        return (self.latent_channels, -(-height // f), -(-width // f))

    def diffusers_config(self) -> dict:
        """Keyword arguments for `AutoencoderKL(**config)`."""
        levels = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            # Normalisation is calibrated from data (`latent_vae.models.normalization`), never guessed: start neutral.
            scaling_factor=1.0,
            shift_factor=0.0,
            latents_mean=None,
            latents_std=None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, VAEPreset] = {
    "f16c16": VAEPreset(
        (128, 128, 256, 256, 512), 16, description="default: 3x1024x1024 -> 16x64x64, like LDM kl-f16"
    ),
    "f8c4": VAEPreset((128, 256, 512, 512), 4, description="SD 1.x/2.x and SDXL VAE layout"),
    "f8c16": VAEPreset((128, 256, 512, 512), 16, description="SD3 / FLUX VAE layout"),
    # Narrow presets of the same depth: CPU demos (narrow) and tests (tiny).
    "f16c16-narrow": VAEPreset(
        (32, 32, 64, 64, 128), 16, norm_num_groups=16, description="CPU demo width of f16c16 (3.1M params)"
    ),
    "f16c16-tiny": VAEPreset(
        (8, 8, 16, 16, 16), 16, layers_per_block=1, norm_num_groups=4, description="test width of f16c16"
    ),
    "f8c4-tiny": VAEPreset(
        (8, 16, 16, 16), 4, layers_per_block=1, norm_num_groups=4, description="test width of f8c4"
    ),
    "f8c16-tiny": VAEPreset(
        (8, 16, 16, 16), 16, layers_per_block=1, norm_num_groups=4, description="test width of f8c16"
    ),
    # With DC-AE-style space-to-channel shortcuts (`latent_vae.models.residual`): learn much faster from scratch.
    "f16c16-res": VAEPreset(
        (128, 128, 256, 256, 512), 16, shortcut="global", description="f16c16 with a residual shortcut"
    ),
    "f16c16-narrow-res": VAEPreset(
        (32, 32, 64, 64, 128), 16, norm_num_groups=16, shortcut="global",
        description="CPU demo width of f16c16-res",
    ),
    # 5x fewer weights than narrow, ~2.7x the steps: learns faster on a 2-core CPU (benchmarks/residual_vs_plain.py).
    "f16c16-small-res": VAEPreset(
        (16, 16, 32, 32, 64), 16, layers_per_block=1, norm_num_groups=16, shortcut="global",
        description="CPU demo: small f16c16 with a residual shortcut (0.8M params)",
    ),
    # The thumbnail shortcut: the code is a YCbCr thumbnail (luma 3x3 and chroma 1x1 per latent pixel) enlarged
    # bicubically; untrained it already beats bicubic resizing at equal values, and it leaves no block texture.
    # The small one is the README's CPU demo, the fastest learner measured here.
    "f16c16-thumb": VAEPreset(
        (128, 128, 256, 256, 512), 16, shortcut="thumbnail", description="f16c16 with a thumbnail shortcut"
    ),
    "f16c16-small-thumb": VAEPreset(
        (16, 16, 32, 32, 64), 16, layers_per_block=1, norm_num_groups=16, shortcut="thumbnail",
        description="CPU demo: small f16c16 with a thumbnail shortcut (0.8M params)",
    ),
    "f16c16-tiny-res": VAEPreset(
        (8, 8, 16, 16, 16), 16, layers_per_block=1, norm_num_groups=4, shortcut="global",
        description="test width of f16c16-res",
    ),
}

DEFAULT_PRESET = "f16c16"


def get_preset(name: str) -> VAEPreset:
    """The preset called `name`; an unknown name is a ValueError that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
