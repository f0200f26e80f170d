"""`ResidualAutoencoderKL`: diffusers' AutoencoderKL with parameter-free shortcuts (DC-AE block codes, or a thumbnail).

DC-AE (Chen et al., arXiv 2410.10733) adds shortcuts around the resampling of an autoencoder: the encoder
folds space into channels (`pixel_unshuffle`) and averages groups of channels down to the next width; the
decoder repeats channels and unfolds them back into space (`pixel_shuffle`). Here the fold puts the
positions in Z-order, so that at factor 16 a group of channels is a compact patch rather than a strip of
rows (+0.4 dB for the untrained global code on Set14); at factor 2 it is exactly pixel_(un)shuffle. The network then learns a
residual on top of a fixed block code instead of discovering even a thumbnail from noise.

Three shortcuts (`shortcut=`):
- "global": one DC-AE block code around the whole network: image -> latent mean, latent -> image.
- "stage": one at every down/up stage as in DC-AE, plus channel averaging/repeating around the stems and
  heads so that an untrained model (`zero_init=True`) is exactly a block code end to end.
- "thumbnail": one shortcut around the whole network whose code is a colour thumbnail, as JPEG subsamples
  colour: each latent pixel starts as its f x f block's luma on a k x k grid (k*k + 2 <= latent channels:
  3 x 3 for 16 channels) and its mean chroma (YCbCr); the decoder's shortcut enlarges them bicubically.
  Untrained, it is already a better image code than the block code (Set14 crops in
  benchmarks/residual_vs_plain.py: 21.9 dB against 19.2; CBSD68 in benchmarks/quality.py: 23.4 dB against
  bicubic RGB at equal values 23.0), and its smooth enlargement leaves no block texture for the network to
  remove; the remaining latent channels start at zero for the network to fill. The enlargement reaches
  two latent pixels across a tile's edge: exact tiling (`latent_vae.codec.tiling`) computes every shortcut on the
  whole tensor (they are cheap), so tiled coding equals whole-image coding here too.

The weights, their names and shapes are AutoencoderKL's; the shortcuts live in the encoder's and decoder's
`forward`, so diffusers' sliced path (which calls `self.encoder`/`self.decoder`) sees them too.
The saved config names block types plain AutoencoderKL does not know, so loading such a folder with
`AutoencoderKL.from_pretrained` fails instead of silently dropping the shortcut: use `latent_vae.load_vae`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ModelMixin  # noqa: F401  (ModelMixin: see below)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn

from .presets import downsampling_factor

# A pipeline saved with this VAE names it ["latent_vae.models.residual", "ResidualAutoencoderKL"] in model_index.json;
# diffusers' pipeline loader then looks up its loadable base classes (ModelMixin) in this module by name,
# which is why ModelMixin is imported here.
SHORTCUTS = ("global", "stage", "thumbnail")
# Block types written to the config: plain AutoencoderKL raises "... does not exist" on them.
DOWN_BLOCK = "ResidualDownEncoderBlock2D"
UP_BLOCK = "ResidualUpDecoderBlock2D"
_PLAIN = {DOWN_BLOCK: "DownEncoderBlock2D", UP_BLOCK: "UpDecoderBlock2D"}
# Initial posterior log-variance with zero_init: a near-deterministic posterior (std 0.007), so that
# sampling does not drown the shortcut's code in unit noise at the start of training.
LOGVAR_INIT = -10.0


def channel_resize(x: torch.Tensor, channels: int) -> torch.Tensor:
    """NxCxHxW -> Nx`channels`xHxW: average groups of consecutive channels (fewer) or repeat each (more).

    Input channel i belongs to output group floor(i * channels / C) when shrinking, and output channel j
    copies input floor(j * C / channels) when growing: the two are inverse on group-constant signals,
    also when the widths do not divide (uneven groups).
    """
    c_in = x.shape[1]
    if channels == c_in:
        return x
    if channels > c_in:
        if channels % c_in == 0:
            return x.repeat_interleave(channels // c_in, dim=1)
        index = torch.arange(channels, device=x.device) * c_in // channels
        return x.index_select(1, index)
    if c_in % channels == 0:
        n, _, h, w = x.shape
        return x.reshape(n, channels, c_in // channels, h, w).mean(dim=2)
    return torch.einsum("oc,nchw->nohw", averaging_matrix(c_in, channels, x), x)


def averaging_matrix(c_in: int, channels: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """`channels` x `c_in` matrix of `channel_resize` (averaging rows when shrinking, one-hot rows when growing)."""
    kwargs = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if channels >= c_in:
        index = torch.arange(channels) * c_in // channels
        return F.one_hot(index, c_in).to(**kwargs)
    group = torch.arange(c_in) * channels // c_in
    matrix = F.one_hot(group, channels).T.float()
    return (matrix / matrix.sum(dim=1, keepdim=True)).to(**kwargs)


def zorder_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """pixel_unshuffle with the f x f positions in Z-order (coarse bit first): consecutive channels are
    compact patches, so averaging channel groups averages squares, not thin rows. Equal to
    `pixel_unshuffle` for factor 2."""
    n, c, h, w = x.shape
    k = _log2(factor)
    x = x.reshape(n, c, h // factor, *([2] * k), w // factor, *([2] * k))
    rows, cols = range(3, 3 + k), range(4 + k, 4 + 2 * k)
    bits = [axis for pair in zip(rows, cols) for axis in pair]
    return x.permute(0, 1, *bits, 2, 3 + k).reshape(n, c * factor * factor, h // factor, w // factor)


def zorder_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of `zorder_unshuffle`."""
    n, channels, h, w = x.shape
    k = _log2(factor)
    x = x.reshape(n, channels // (factor * factor), *([2] * (2 * k)), h, w)
    rows, cols = range(2, 2 + 2 * k, 2), range(3, 3 + 2 * k, 2)
    return x.permute(0, 1, 2 + 2 * k, *rows, 3 + 2 * k, *cols).reshape(n, -1, h * factor, w * factor)


def _log2(factor: int) -> int:
    k = factor.bit_length() - 1
    if factor != 2**k:
        raise ValueError(f"shortcut factors are powers of 2, got {factor}")
    return k


def space_to_channel(x: torch.Tensor, channels: int, factor: int) -> torch.Tensor:
    """NxCxHxW -> Nx`channels`x(H/f)x(W/f): fold space into channels, then average channel groups (the encoder
    shortcut)."""
    _check_divisible(x, factor)
    return channel_resize(zorder_unshuffle(x, factor), channels)


def channel_to_space(x: torch.Tensor, channels: int, factor: int) -> torch.Tensor:
    """NxCxhxw -> Nx`channels`x(h*f)x(w*f): repeat channels, then unfold them into space (the decoder shortcut)."""
    return zorder_shuffle(channel_resize(x, channels * factor * factor), factor)


# JPEG's full-range BT.601 RGB -> YCbCr (without the offset: images here are centred on 0).
RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCBCR_TO_RGB = torch.linalg.inv(RGB_TO_YCBCR)


def luma_grid(latent_channels: int) -> int:
    """k: the thumbnail code's luma samples per latent pixel are k x k, leaving 2 channels for chroma."""
    k = math.isqrt(latent_channels - 2) if latent_channels >= 3 else 0
    if k < 1:
        raise ValueError(f"a thumbnail shortcut needs at least 3 latent channels, got {latent_channels}")
    return k


def _colour_transform(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nchw->nohw", matrix.to(device=x.device, dtype=x.dtype), x)


def thumbnail_code(x: torch.Tensor, latent_channels: int, factor: int) -> torch.Tensor:
    """Nx3xHxW RGB -> Nx`latent_channels`x(H/f)x(W/f): per f x f block, its luma averaged over a k x k grid
    (channels 0..k*k-1, row-major), its mean Cb and Cr (the next two); the rest zero (the encoder shortcut)."""
    _check_divisible(x, factor)
    k = luma_grid(latent_channels)
    n, _, height, width = x.shape
    h, w = height // factor, width // factor
    ycbcr = _colour_transform(RGB_TO_YCBCR, x)
    # adaptive pooling to k cells per block: when k does not divide f the cells overlap by a pixel, but they
    # never leave their block, so a latent pixel's code depends on its own block only.
    luma = F.pixel_unshuffle(F.adaptive_avg_pool2d(ycbcr[:, :1], (h * k, w * k)), k)
    chroma = F.avg_pool2d(ycbcr[:, 1:], factor)
    unused = x.new_zeros(n, latent_channels - k * k - 2, h, w)
    return torch.cat([luma, chroma, unused], dim=1)


def thumbnail_image(z: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse direction: NxCxhxw latent -> Nx3x(h*f)x(w*f) RGB, luma and chroma enlarged bicubically
    (the decoder shortcut; the unused channels are ignored)."""
    k = luma_grid(z.shape[1])
    size = (z.shape[-2] * factor, z.shape[-1] * factor)
    luma = F.pixel_shuffle(z[:, : k * k], k)
    chroma = z[:, k * k : k * k + 2]
    ycbcr = torch.cat([F.interpolate(t, size=size, mode="bicubic", align_corners=False) for t in (luma, chroma)], 1)
    return _colour_transform(YCBCR_TO_RGB, ycbcr)


def _check_divisible(x: torch.Tensor, factor: int) -> None:
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(
            f"a shortcut model needs sizes divisible by {factor}, got {tuple(x.shape[-2:])}: "
            "pad the image (LatentCodec does)"
        )


def _run(module: nn.Module, owner: nn.Module, *args):
    if torch.is_grad_enabled() and owner.gradient_checkpointing:
        return owner._gradient_checkpointing_func(module, *args)
    return module(*args)


class ShortcutEncoder(Encoder):
    """diffusers' Encoder whose forward adds the shortcuts; the posterior mean (first half of the output
    channels) carries the code, the log-variance none."""

    shortcut: str = "global"
    factor: int = 16

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        x = sample
        _check_divisible(x, self.factor)
        stage = self.shortcut == "stage"
        h = self.conv_in(x)
        if stage:
            h = h + channel_resize(x, h.shape[1])
        for block in self.down_blocks:
            out = _run(block, self, h)
            if stage and block.downsamplers is not None:
                out = out + space_to_channel(h, out.shape[1], 2)
            h = out
        h = _run(self.mid_block, self, h)
        moments = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        latent_channels = moments.shape[1] // 2
        if stage:
            code = channel_resize(h, latent_channels)
        elif self.shortcut == "thumbnail":
            code = thumbnail_code(x, latent_channels, self.factor)
        else:
            code = space_to_channel(x, latent_channels, self.factor)
        mean, logvar = moments.split(latent_channels, dim=1)
        return torch.cat([mean + code, logvar], dim=1)


class ShortcutDecoder(Decoder):
    """diffusers' Decoder whose forward adds the shortcuts."""

    shortcut: str = "global"
    factor: int = 16

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if latent_embeds is not None:
            raise ValueError("ShortcutDecoder supports group norm only (no latent_embeds)")
        z = sample
        stage = self.shortcut == "stage"
        h = self.conv_in(z)
        if stage:
            h = h + channel_resize(z, h.shape[1])
        h = _run(self.mid_block, self, h, None)
        for block in self.up_blocks:
            out = _run(block, self, h, None)
            if stage and block.upsamplers is not None:
                out = out + channel_to_space(h, out.shape[1], 2)
            h = out
        image = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        if stage:
            return image + channel_resize(h, image.shape[1])
        if self.shortcut == "thumbnail":
            return image + thumbnail_image(z, self.factor).to(image.dtype)
        return image + channel_to_space(z, image.shape[1], self.factor)


class ResidualAutoencoderKL(AutoencoderKL):
    """AutoencoderKL with parameter-free shortcuts (block or thumbnail codes); the same state-dict keys.

    Args (beyond AutoencoderKL's, which keep their meaning):
        shortcut: "global" (a DC-AE block code around the whole network: learns faster here than "stage"),
            "stage" (at every down/up stage, as in DC-AE) or "thumbnail" (around the whole network, a
            YCbCr thumbnail code enlarged bicubically: the best start; needs RGB images).
        zero_init: start from the shortcut's code: zero the last layer of every residual branch (every
            shortcut: the network heads; "stage": also every resnet, attention and resampling branch), set the
            quant convs to identity and the posterior log-variance to LOGVAR_INIT. Without it the branches
            keep diffusers' initialisation and the shortcut is added to them. Only affects fresh weights.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str] = (DOWN_BLOCK,),
        up_block_types: tuple[str] = (UP_BLOCK,),
        block_out_channels: tuple[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        shortcut: str = "global",
        zero_init: bool = True,
    ):
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        if shortcut == "thumbnail":
            if in_channels != 3 or out_channels != 3:
                raise ValueError(f"a thumbnail shortcut codes RGB images, got {in_channels} -> {out_channels} channels")
            luma_grid(latent_channels)
        down_block_types = tuple(_plain_block(t, DOWN_BLOCK) for t in down_block_types)
        up_block_types = tuple(_plain_block(t, UP_BLOCK) for t in up_block_types)
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
            up_block_types=up_block_types, block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            act_fn=act_fn, latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=sample_size,
            scaling_factor=scaling_factor, shift_factor=shift_factor, latents_mean=latents_mean,
            latents_std=latents_std, force_upcast=force_upcast, use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv, mid_block_add_attention=mid_block_add_attention,
        )
        # AutoencoderKL's own register_to_config wrote the plain block types: write the guarded ones back.
        self.register_to_config(
            down_block_types=(DOWN_BLOCK,) * len(down_block_types), up_block_types=(UP_BLOCK,) * len(up_block_types)
        )
        factor = downsampling_factor(block_out_channels)
        # The same modules and parameters, with a forward that adds the shortcuts (no new state).
        for module, cls in ((self.encoder, ShortcutEncoder), (self.decoder, ShortcutDecoder)):
            module.__class__ = cls
            module.shortcut, module.factor = shortcut, factor
        self._init_from_shortcut(zero_init)

    @property
    def downsampling_factor(self) -> int:
        return self.encoder.factor

    @torch.no_grad()
    def _init_from_shortcut(self, zero_init: bool) -> None:
        latent_channels = self.config.latent_channels
        for conv in (self.quant_conv, self.post_quant_conv):
            if conv is not None:  # identity: the code reaches the latent and the decoder unmixed
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :, 0, 0].copy_(torch.eye(conv.weight.shape[0]))
        if not zero_init:
            return
        branch_ends = [self.encoder.conv_out, self.decoder.conv_out]
        if self.config.shortcut == "stage":
            branch_ends += [self.encoder.conv_in, self.decoder.conv_in]
            for name, module in self.named_modules():
                # resnet, attention and resampling branch ends
                if name.endswith(("conv2", "to_out.0", "downsamplers.0.conv", "upsamplers.0.conv")):
                    branch_ends.append(module)
                elif name.endswith("conv_shortcut") and module.kernel_size == (1, 1):
                    # a resnet changing width: its 1x1 shortcut becomes the parameter-free channel resize
                    module.weight.zero_()
                    module.weight[:, :, 0, 0].copy_(averaging_matrix(module.in_channels, module.out_channels))
                    module.bias.zero_()
        for module in branch_ends:
            module.weight.zero_()
            module.bias.zero_()
        self.encoder.conv_out.bias[latent_channels:].fill_(LOGVAR_INIT)


def _plain_block(block_type: str, residual_name: str) -> str:
    plain = _PLAIN[residual_name]
    if block_type not in (residual_name, plain):
        raise ValueError(f"ResidualAutoencoderKL builds {plain} blocks only, got {block_type!r}")
    return plain


def untrained_code_model(vae: torch.nn.Module) -> ResidualAutoencoderKL | None:
    """The same shortcut architecture with fresh zero-init weights: the parameter-free code the model started
    from, to show what training added. None for a model without a shortcut."""
    if not isinstance(vae, ResidualAutoencoderKL):
        return None
    return ResidualAutoencoderKL.from_config({**vae.config, "zero_init": True})
