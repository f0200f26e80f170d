"""Reading a diffusers VAE into a program of operations, cut into levels at the resolution changes."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ...models.residual import channel_to_space, space_to_channel, thumbnail_code, thumbnail_image
from .ops import Add, Conv, Norm, Op, Untileable, UpsampleNearest


@dataclass
class Level:
    """The operations between two resolution changes (or around an untileable shortcut code)."""

    ops: list[Op]

    @property
    def untileable(self) -> bool:
        return any(op.untileable for op in self.ops)


@dataclass
class Program:
    """The encoder (image -> posterior moments after quant_conv) or decoder (raw latent -> image) as levels."""

    levels: list[Level]
    input: str
    output: str
    input_channels: int

    @property
    def ops(self) -> list[Op]:
        return [op for level in self.levels for op in level.ops]

    def sizes(self, height: int, width: int) -> dict:
        sizes = {self.input: (height, width)}
        for op in self.ops:
            sizes[op.dst] = op.out_size(sizes)
        return sizes

    def channels(self) -> dict:
        channels = {self.input: self.input_channels}
        channels.update({op.dst: op.channels for op in self.ops})
        return channels


class _Builder:
    def __init__(self):
        self.levels: list[Level] = [Level([])]
        self.count = 0

    def cut(self) -> None:
        if self.levels[-1].ops:
            self.levels.append(Level([]))

    def add(self, op: Op) -> str:
        self.levels[-1].ops.append(op)
        return op.dst

    def name(self) -> str:
        self.count += 1
        return f"r{self.count}"

    def conv(self, x: str, conv: nn.Module, extra_pad: int = 0) -> str:
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"exact tiling supports plain Conv2d layers, got {type(conv).__name__}")
        pad = conv.padding
        if isinstance(pad, str) or pad[0] != pad[1] or conv.padding_mode != "zeros":
            raise ValueError(f"exact tiling supports square zero padding, got {pad!r} ({conv.padding_mode})")
        return self.add(Conv((x,), self.name(), conv.out_channels, conv=conv, pad_lo=pad[0], pad_hi=pad[0] + extra_pad))

    def norm(self, x: str, norm: nn.Module, channels: int, silu: bool = True) -> str:
        if type(norm) is not nn.GroupNorm:
            raise ValueError(f"exact tiling supports GroupNorm, got {type(norm).__name__}")
        return self.add(Norm((x,), self.name(), channels, norm=norm, silu=silu))

    def resnet(self, x: str, block: nn.Module, channels: int) -> tuple[str, int]:
        if not isinstance(block, ResnetBlock2D):
            raise ValueError(f"exact tiling supports ResnetBlock2D, got {type(block).__name__}")
        if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
            raise ValueError("exact tiling supports ResnetBlock2D without time embedding or resampling")
        if not isinstance(block.nonlinearity, nn.SiLU) or block.time_embedding_norm not in ("default", "group"):
            raise ValueError("exact tiling supports ResnetBlock2D with SiLU and default normalisation")
        h = self.norm(x, block.norm1, channels)
        h = self.conv(h, block.conv1)
        out_channels = block.conv1.out_channels
        h = self.norm(h, block.norm2, out_channels)
        h = self.conv(h, block.conv2)
        shortcut = self.conv(x, block.conv_shortcut) if block.conv_shortcut is not None else x
        return self.add(Add((h, shortcut), self.name(), out_channels, scale=block.output_scale_factor)), out_channels

    def attention(self, x: str, attn: nn.Module, channels: int) -> str:
        if not isinstance(attn, Attention):
            raise ValueError(f"exact tiling supports diffusers Attention, got {type(attn).__name__}")
        return self.add(Untileable((x,), self.name(), channels, fn=attn))

    def block(self, x: str, block: nn.Module, channels: int) -> tuple[str, int]:
        """The resnets (and attentions) of a down/up/mid block."""
        attentions = getattr(block, "attentions", None) or []
        if type(block).__name__.startswith("UNetMidBlock"):
            x, channels = self.resnet(x, block.resnets[0], channels)
            for attn, resnet in zip(attentions, block.resnets[1:]):
                if attn is not None:
                    x = self.attention(x, attn, channels)
                x, channels = self.resnet(x, resnet, channels)
            return x, channels
        for i, resnet in enumerate(block.resnets):
            x, channels = self.resnet(x, resnet, channels)
            if i < len(attentions):
                x = self.attention(x, attentions[i], channels)
        return x, channels

    def downsample(self, x: str, down: nn.Module) -> str:
        if not isinstance(down, Downsample2D) or not down.use_conv or down.norm is not None:
            raise ValueError(f"exact tiling supports Downsample2D with a convolution, got {type(down).__name__}")
        return self.conv(x, down.conv, extra_pad=1 if down.padding == 0 else 0)

    def upsample(self, x: str, up: nn.Module, channels: int) -> str:
        if (not isinstance(up, Upsample2D) or up.use_conv_transpose or not up.interpolate or up.norm is not None
                or not up.use_conv):
            raise ValueError(f"exact tiling supports Upsample2D (nearest x2, conv), got {type(up).__name__}")
        x = self.add(UpsampleNearest((x,), self.name(), channels))
        return self.conv(x, up.conv if up.name == "conv" else up.Conv2d_0)


def _supported(module: nn.Module, name: str) -> None:
    for sub in module.modules():
        kind = type(sub).__name__
        if kind in ("SpatialNorm", "AdaGroupNorm", "FirDownsample2D", "FirUpsample2D", "KDownsample2D",
                    "KUpsample2D"):
            raise ValueError(f"exact tiling does not support {kind} (in the {name})")


def encoder_program(vae: nn.Module) -> Program:
    """image -> posterior moments (what `vae._encode` returns)."""
    encoder = vae.encoder
    _supported(encoder, "encoder")
    shortcut = getattr(encoder, "shortcut", None)  # a ResidualAutoencoderKL's ShortcutEncoder
    b = _Builder()
    x = "x"
    latent_channels = encoder.conv_out.out_channels // 2
    code = None
    if shortcut in ("global", "thumbnail"):
        factor = encoder.factor
        fn = (lambda t: thumbnail_code(t, latent_channels, factor)) if shortcut == "thumbnail" else (
            lambda t: space_to_channel(t, latent_channels, factor))
        code = b.add(Untileable((x,), b.name(), latent_channels, fn=fn,
                           size_fn=lambda s: (s[0] // factor, s[1] // factor)))
        b.cut()
    stage = shortcut == "stage"
    channels = encoder.conv_in.out_channels
    h = b.conv(x, encoder.conv_in)
    if stage:
        h = b.add(Add((h, x), b.name(), channels, shortcut="resize", shortcut_channels=channels))
    for block in encoder.down_blocks:
        block_input = h
        h, channels = b.block(h, block, channels)
        if block.downsamplers is not None:
            h = b.downsample(h, block.downsamplers[0])
            if stage:
                h = b.add(Add((h, block_input), b.name(), channels, shortcut="s2c", shortcut_channels=channels))
            b.cut()  # store the lower-resolution tensor
    h, channels = b.block(h, encoder.mid_block, channels)
    out = b.norm(h, encoder.conv_norm_out, channels, silu=isinstance(encoder.conv_act, nn.SiLU))
    if not isinstance(encoder.conv_act, nn.SiLU):
        raise ValueError(f"exact tiling supports SiLU activations, got {type(encoder.conv_act).__name__}")
    out = b.conv(out, encoder.conv_out)
    if stage:
        out = b.add(Add((out, h), b.name(), 2 * latent_channels, shortcut="resize", shortcut_channels=latent_channels))
    elif code is not None:
        out = b.add(Add((out, code), b.name(), 2 * latent_channels))
    if vae.quant_conv is not None:
        out = b.conv(out, vae.quant_conv)
    return Program(b.levels, x, out, encoder.conv_in.in_channels)


def decoder_program(vae: nn.Module) -> Program:
    """raw latent -> image (what `vae._decode` returns as `sample`)."""
    decoder = vae.decoder
    _supported(decoder, "decoder")
    shortcut = getattr(decoder, "shortcut", None)
    b = _Builder()
    z = "z"
    if vae.post_quant_conv is not None:
        z = b.conv(z, vae.post_quant_conv)
    image_channels = decoder.conv_out.out_channels
    image_shortcut = None
    if shortcut in ("global", "thumbnail"):
        factor = decoder.factor
        fn = (lambda t: thumbnail_image(t, factor)) if shortcut == "thumbnail" else (
            lambda t: channel_to_space(t, image_channels, factor))
        image_shortcut = b.add(Untileable((z,), b.name(), image_channels, fn=fn,
                                     size_fn=lambda s: (s[0] * factor, s[1] * factor)))
    stage = shortcut == "stage"
    channels = decoder.conv_in.out_channels
    h = b.conv(z, decoder.conv_in)
    if stage:
        h = b.add(Add((h, z), b.name(), channels, shortcut="resize", shortcut_channels=channels))
    h, channels = b.block(h, decoder.mid_block, channels)
    for block in decoder.up_blocks:
        block_input = h
        h, channels = b.block(h, block, channels)
        if block.upsamplers is not None:
            b.cut()  # store the lower-resolution tensor
            h = b.upsample(h, block.upsamplers[0], channels)
            if stage:
                h = b.add(Add((h, block_input), b.name(), channels, shortcut="c2s", shortcut_channels=channels))
    if not isinstance(decoder.conv_act, nn.SiLU):
        raise ValueError(f"exact tiling supports SiLU activations, got {type(decoder.conv_act).__name__}")
    out = b.norm(h, decoder.conv_norm_out, channels)
    out = b.conv(out, decoder.conv_out)
    if stage:
        out = b.add(Add((out, h), b.name(), image_channels, shortcut="resize", shortcut_channels=image_channels))
    elif image_shortcut is not None:
        out = b.add(Add((out, image_shortcut), b.name(), image_channels))
    return Program(b.levels, "z", out, decoder.conv_in.in_channels if vae.post_quant_conv is None
                   else vae.post_quant_conv.in_channels)


def program_for(vae: nn.Module, direction: str) -> Program:
    if direction not in ("encode", "decode"):
        raise ValueError(f"unknown direction {direction!r}; choose encode or decode")
    key = f"_exact_tiling_{direction}_program"
    program = getattr(vae, key, None)  # built once per model: it only holds references to its modules
    if program is None:
        program = encoder_program(vae) if direction == "encode" else decoder_program(vae)
        object.__setattr__(vae, key, program)  # not a submodule, not in the state dict
    return program
