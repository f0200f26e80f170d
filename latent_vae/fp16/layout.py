"""Which tensors of a KL-VAE must share a scale, and which layers change it: the stage graph of `latent_vae.fp16.rescale`.

In diffusers' AutoencoderKL every tensor of the residual stream reaches a nonlinearity only through a GroupNorm
(resnets' `norm1`, attention's `group_norm`, `conv_norm_out`), and so does each resnet's inner branch (`conv1`
feeds `norm2`). GroupNorm(a * x) with eps * a**2 equals GroupNorm(x) with eps, for any a > 0. So a stretch of the
stream can be carried at any scale, as long as everything added together shares it:

- a *stream* stage runs from a layer whose weights write the stream (`conv_in`, a resnet's `conv_shortcut`, a
  down/up sampler's conv) through every resnet and attention with an identity shortcut, up to the next such
  layer; the branches added onto it (resnets' `conv2`, attention's `to_out.0`) carry its scale too;
- a *branch* stage is one resnet's `conv1` output, read only by its `norm2`;
- a *fixed* stage keeps scale 1: the image, the posterior moments (the latent), the decoder's input (residual
  shortcuts read it), the decoded image, attention's queries, keys and values, and whatever the parameter-free
  shortcuts of `ResidualAutoencoderKL` add to or read from unscaled tensors ("stage": the stream at every block
  boundary).

`stage_graph(vae)` walks the model in the order its forward runs and records, for every layer, the stage it
reads and the stage it writes. A module it does not know, or a known one configured in a way whose arithmetic is
not the above (a resnet with a time embedding, a SpatialNorm, a norm that is not GroupNorm, a custom attention
processor, ...), is refused by name: the transform never rescales on a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import (
    AttnDownEncoderBlock2D,
    AttnUpDecoderBlock2D,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
)
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..models.residual import ResidualAutoencoderKL, ShortcutDecoder, ShortcutEncoder
from ..utils.errors import Fp16FixError

LINEAR_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# Elementwise functions that follow a GroupNorm: they never see the stream's scale.
ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)
ATTENTION_PROCESSORS = (AttnProcessor, AttnProcessor2_0)
STREAM, BRANCH, FIXED = "stream", "branch", "fixed"


@dataclass
class Stage:
    """Tensors that share one power-of-two factor: a stretch of the stream, a resnet's inner branch, or a fixed
    tensor."""

    name: str
    kind: str  # STREAM, BRANCH or FIXED
    span: list[str] = field(default_factory=list)  # the convs, resnets and attentions it runs through
    fixed_because: str | None = None  # why a FIXED stage may not be rescaled
    peak_before: float = 0.0  # the largest |value| measured, in fp32
    peak_at: str = ""  # the member where it was measured
    factor: float = 1.0  # the power of two the transform multiplies the stage by

    @property
    def peak_after(self) -> float:
        return self.peak_before * self.factor

    @property
    def free(self) -> bool:
        return self.kind != FIXED

    @property
    def label(self) -> str:
        """"first .. last" of the layers a stream stage runs through; the name alone for one layer."""
        last = self.span[-1] if self.span else self.name
        return self.name if last == self.name else f"{self.name} .. {last}"


def refuse(name: str, module: nn.Module, why: str) -> Fp16FixError:
    return Fp16FixError(f"{name or 'the model'} ({type(module).__name__}): {why}; the fp16 transform cannot prove "
                        "this scale-invariant, so it refuses the model rather than rescale it on a guess")


def _require(condition: bool, name: str, module: nn.Module, why: str) -> None:
    if not condition:
        raise refuse(name, module, why)


def _expect(module: nn.Module, name: str, *classes: type) -> None:
    # The exact class: a subclass may override forward with other arithmetic.
    _require(type(module) in classes, name, module,
             f"not a layer this transform knows (expected {' or '.join(c.__name__ for c in classes)})")


def is_power_of_two(factor: float) -> bool:
    return factor > 0 and math.isfinite(factor) and math.frexp(factor)[0] == 0.5


class StageGraph:
    """Stages (a union-find over the tensors of one forward pass) and the layers that read and write them."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._stages: list[Stage] = []
        # (name, layer, stage read, stage written); a read of None: the layer reads a normalised tensor
        self.linears: list[tuple[str, nn.Module, int | None, int]] = []
        self.norms: list[tuple[str, nn.GroupNorm, int]] = []  # (name, norm, reads)
        self.watches: list[tuple[str, nn.Module, int, str]] = []  # (name, module, stage, "output" or "input")
        self.covered: set[int] = set()  # id() of every module the walk accounted for

    # -- building --------------------------------------------------------------------------------------------

    def stage(self, name: str, kind: str, fixed_because: str | None = None) -> int:
        self._parent.append(len(self._parent))
        self._stages.append(Stage(name, kind, fixed_because=fixed_because))
        return len(self._parent) - 1

    def fixed(self, name: str, why: str) -> int:
        return self.stage(name, FIXED, why)

    def find(self, slot: int) -> int:
        while self._parent[slot] != slot:
            self._parent[slot] = self._parent[self._parent[slot]]
            slot = self._parent[slot]
        return slot

    def tie(self, a: int, b: int) -> int:
        """a and b are added together (or one is the other): they share a scale."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        first, second = sorted((a, b))  # the earlier stage names the merged one
        kept, merged = self._stages[first], self._stages[second]
        kept.span += merged.span
        if merged.kind == FIXED and kept.kind != FIXED:
            kept.kind, kept.fixed_because = FIXED, merged.fixed_because
        self._parent[second] = first
        return first

    def pin(self, slot: int, why: str) -> None:
        self.tie(slot, self.fixed(self._stages[self.find(slot)].name, why))

    def member(self, slot: int, name: str) -> None:
        self._stages[self.find(slot)].span.append(name)

    def cover(self, *modules: nn.Module | None) -> None:
        self.covered.update(id(m) for m in modules if m is not None)

    def watch(self, name: str, module: nn.Module, slot: int, where: str = "output") -> None:
        self.watches.append((name, module, slot, where))

    def linear(self, name: str, layer: nn.Module, reads: int | None, writes: int) -> None:
        """A convolution or linear layer from stage `reads` (None: a normalised tensor) into stage `writes`."""
        _expect(layer, name, *LINEAR_LAYERS)
        if id(layer) in {id(m) for _, m, _, _ in self.linears}:
            raise RuntimeError(f"internal: {name} recorded twice")
        self.linears.append((name, layer, reads, writes))
        self.watch(name, layer, writes)
        self.cover(layer)

    def norm(self, name: str, norm: nn.Module, reads: int) -> None:
        _require(type(norm) is nn.GroupNorm, name, norm, "only GroupNorm is known to ignore its input's scale")
        self.norms.append((name, norm, reads))
        self.watch(name, norm, reads, "input")
        self.cover(norm)

    # -- reading ---------------------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """One Stage per set of tied tensors that something watches, in forward order."""
        roots = {self.find(slot) for _, _, slot, _ in self.watches}
        return [self._stages[root] for root in sorted(roots)]

    def stage_of(self, slot: int | None) -> Stage | None:
        return None if slot is None else self._stages[self.find(slot)]

    def rescale(self, factors: Mapping[str, float]) -> None:
        """Multiply the named stages by powers of two, keeping the model's function: each linear layer's weight
        by (factor written / factor read) and its bias by the factor written, each GroupNorm's eps by the square
        of the factor it reads. Powers of two make every multiplication exact in floating point."""
        by_name = {stage.name: stage for stage in self.stages()}
        for name, factor in factors.items():
            stage = by_name.get(name)
            if stage is None:
                raise ValueError(f"no stage named {name!r}")
            if not is_power_of_two(factor):
                raise ValueError(f"{name}: factors are powers of two (exact in floating point), got {factor}")
            if stage.kind == FIXED and factor != 1:
                raise ValueError(f"{name} is fixed ({stage.fixed_because}): it keeps scale 1")

        def factor_of(slot: int | None) -> float:
            return 1.0 if slot is None else factors.get(self.stage_of(slot).name, 1.0)

        with torch.no_grad():
            for _, layer, reads, writes in self.linears:
                ratio, out = factor_of(writes) / factor_of(reads), factor_of(writes)
                if ratio != 1:
                    layer.weight.mul_(ratio)
                if layer.bias is not None and out != 1:
                    layer.bias.mul_(out)
            for _, norm, reads in self.norms:
                norm.eps = norm.eps * factor_of(reads) ** 2


# -- the walk: one function per layer kind, each in the order diffusers' forward runs it ---------------------


def _resnet(g: StageGraph, name: str, resnet: nn.Module, x: int) -> int:
    """ResnetBlock2D: out = (conv_shortcut(x) or x) + conv2(act(norm2(conv1(act(norm1(x)))))) / output_scale_factor."""
    _expect(resnet, name, ResnetBlock2D)
    _require(resnet.time_emb_proj is None, name, resnet, "a time embedding (temb) adds an unscaled term to its branch")
    # Without a time embedding both of these are plain norm2 (the decoder's blocks say "group").
    _require(resnet.time_embedding_norm in ("default", "group"), name, resnet,
             f"time_embedding_norm {resnet.time_embedding_norm!r}")
    _require(resnet.upsample is None and resnet.downsample is None, name, resnet, "it resamples inside the block")
    _require(isinstance(resnet.nonlinearity, ACTIVATIONS), name, resnet,
             f"activation {type(resnet.nonlinearity).__name__}")
    g.cover(resnet, resnet.nonlinearity, resnet.dropout)
    g.norm(f"{name}.norm1", resnet.norm1, x)
    inner = g.stage(f"{name}.conv1", BRANCH)
    g.linear(f"{name}.conv1", resnet.conv1, None, inner)
    g.norm(f"{name}.norm2", resnet.norm2, inner)
    out = x
    if resnet.conv_shortcut is not None:  # the one place inside a resnet where the stream's scale may change
        out = g.stage(name, STREAM)
        g.linear(f"{name}.conv_shortcut", resnet.conv_shortcut, x, out)
    g.linear(f"{name}.conv2", resnet.conv2, None, out)
    g.watch(name, resnet, out)
    g.member(out, name)
    return out


def _attention(g: StageGraph, name: str, attn: nn.Module, x: int) -> int:
    """The VAE's self-attention: out = (to_out(attention(group_norm(x))) + x) / rescale_output_factor."""
    _expect(attn, name, Attention)
    _require(type(attn.processor) in ATTENTION_PROCESSORS, name, attn,
             f"attention processor {type(attn.processor).__name__} (vae.set_default_attn_processor() restores "
             "diffusers' own)")
    _require(attn.spatial_norm is None, name, attn, "a spatial_norm reads the latent into the stream")
    _require(attn.group_norm is not None, name, attn, "without a group_norm its queries read the stream's scale")
    _require(attn.norm_cross is None and not attn.is_cross_attention, name, attn, "cross-attention")
    _require(getattr(attn, "add_k_proj", None) is None, name, attn, "added key/value projections")
    _require(not getattr(attn, "fused_projections", False), name, attn, "fused q/k/v projections")
    _require(attn.residual_connection, name, attn, "no residual connection")
    g.cover(attn, attn.to_out, attn.to_out[1])
    g.norm(f"{name}.group_norm", attn.group_norm, x)
    for projection in ("to_q", "to_k", "to_v"):
        qkv = g.fixed(f"{name}.{projection}", "attention's queries, keys and values (from the normalised stream)")
        g.linear(f"{name}.{projection}", getattr(attn, projection), None, qkv)
    g.linear(f"{name}.to_out.0", attn.to_out[0], None, x)
    g.watch(name, attn, x)
    g.member(x, name)
    return x


def _resampler(g: StageGraph, name: str, sampler: nn.Module, x: int, kind: type) -> int:
    """Downsample2D (zero padding, strided conv; or average pooling) / Upsample2D (nearest, conv; or a transposed
    conv): linear in the stream, so a conv may change its scale."""
    _expect(sampler, name, kind)
    _require(sampler.norm is None, name, sampler, f"a {type(sampler.norm).__name__} before resampling")
    g.cover(sampler)
    uses_conv = sampler.use_conv or getattr(sampler, "use_conv_transpose", False)
    if not uses_conv:  # pooling or interpolation alone keeps the scale
        g.cover(getattr(sampler, "conv", None))
        return x
    conv = sampler.conv if hasattr(sampler, "conv") else sampler.Conv2d_0
    out = g.stage(name, STREAM)
    g.linear(f"{name}.{'conv' if hasattr(sampler, 'conv') else 'Conv2d_0'}", conv, x, out)
    g.member(out, name)
    return out


def _block(g: StageGraph, name: str, block: nn.Module, x: int) -> int:
    """Down/up blocks: resnets (each followed by an attention in the Attn blocks), then the resampler."""
    _expect(block, name, DownEncoderBlock2D, AttnDownEncoderBlock2D, UpDecoderBlock2D, AttnUpDecoderBlock2D)
    g.cover(block)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        _require(len(attentions) == len(block.resnets), name, block, "as many attentions as resnets")
    for i, resnet in enumerate(block.resnets):
        x = _resnet(g, f"{name}.resnets.{i}", resnet, x)
        if attentions is not None:
            x = _attention(g, f"{name}.attentions.{i}", attentions[i], x)
    for kind, samplers in ((Downsample2D, getattr(block, "downsamplers", None)),
                           (Upsample2D, getattr(block, "upsamplers", None))):
        for i, sampler in enumerate(samplers or []):
            x = _resampler(g, f"{name}.{'down' if kind is Downsample2D else 'up'}samplers.{i}", sampler, x, kind)
    return x


def _mid_block(g: StageGraph, name: str, block: nn.Module, x: int) -> int:
    """UNetMidBlock2D: resnets[0], then (attention or none, resnet) pairs."""
    _expect(block, name, UNetMidBlock2D)
    g.cover(block)
    x = _resnet(g, f"{name}.resnets.0", block.resnets[0], x)
    for i, (attn, resnet) in enumerate(zip(block.attentions, block.resnets[1:])):
        if attn is not None:
            x = _attention(g, f"{name}.attentions.{i}", attn, x)
        x = _resnet(g, f"{name}.resnets.{i + 1}", resnet, x)
    return x


def _shortcut(coder: nn.Module) -> str | None:
    return coder.shortcut if isinstance(coder, (ShortcutEncoder, ShortcutDecoder)) else None


def _encoder(g: StageGraph, encoder: nn.Module, image: int) -> int:
    _expect(encoder, "encoder", Encoder, ShortcutEncoder)
    _require(isinstance(encoder.conv_act, ACTIVATIONS), "encoder.conv_act", encoder.conv_act, "unknown activation")
    stage_shortcut = _shortcut(encoder) == "stage"
    g.cover(encoder, encoder.conv_act)
    h = g.stage("encoder.conv_in", STREAM)
    g.linear("encoder.conv_in", encoder.conv_in, image, h)
    g.member(h, "encoder.conv_in")
    if stage_shortcut:
        g.pin(h, "the stage shortcut adds the image's channels to it")
    for i, block in enumerate(encoder.down_blocks):
        out = _block(g, f"encoder.down_blocks.{i}", block, h)
        if stage_shortcut and block.downsamplers is not None:
            g.tie(out, h)  # out = block(h) + space_to_channel(h)
        h = out
    h = _mid_block(g, "encoder.mid_block", encoder.mid_block, h)
    if stage_shortcut:
        g.pin(h, "the stage shortcut reads it into the latent")
    g.norm("encoder.conv_norm_out", encoder.conv_norm_out, h)
    moments = g.fixed("encoder.conv_out", "the posterior moments (the latent)")
    g.linear("encoder.conv_out", encoder.conv_out, None, moments)
    return moments


def _decoder(g: StageGraph, decoder: nn.Module, z: int) -> int:
    _expect(decoder, "decoder", Decoder, ShortcutDecoder)
    _require(isinstance(decoder.conv_act, ACTIVATIONS), "decoder.conv_act", decoder.conv_act, "unknown activation")
    stage_shortcut = _shortcut(decoder) == "stage"
    g.cover(decoder, decoder.conv_act)
    h = g.stage("decoder.conv_in", STREAM)
    g.linear("decoder.conv_in", decoder.conv_in, z, h)
    g.member(h, "decoder.conv_in")
    if stage_shortcut:
        g.pin(h, "the stage shortcut adds the latent's channels to it")
    h = _mid_block(g, "decoder.mid_block", decoder.mid_block, h)
    for i, block in enumerate(decoder.up_blocks):
        out = _block(g, f"decoder.up_blocks.{i}", block, h)
        if stage_shortcut and block.upsamplers is not None:
            g.tie(out, h)  # out = block(h) + channel_to_space(h)
        h = out
    if stage_shortcut:
        g.pin(h, "the stage shortcut adds it to the image")
    g.norm("decoder.conv_norm_out", decoder.conv_norm_out, h)  # a SpatialNorm is refused here
    image = g.fixed("decoder.conv_out", "the decoded image")
    g.linear("decoder.conv_out", decoder.conv_out, None, image)
    return image


def stage_graph(vae: nn.Module) -> StageGraph:
    """The stages of `vae` (an AutoencoderKL or ResidualAutoencoderKL); anything else, or any module the walk did
    not account for, is an Fp16FixError naming it."""
    _expect(vae, "", AutoencoderKL, ResidualAutoencoderKL)
    g = StageGraph()
    g.cover(vae)
    moments = _encoder(g, vae.encoder, g.fixed("image", "the input image"))
    latent = moments
    if vae.quant_conv is not None:
        latent = g.fixed("quant_conv", "the posterior moments (the latent)")
        g.linear("quant_conv", vae.quant_conv, moments, latent)
    decoder_input = g.fixed("latent", "the latent")
    if vae.post_quant_conv is not None:
        latent_in, decoder_input = decoder_input, g.fixed("post_quant_conv", "the decoder's input (shortcuts read it)")
        g.linear("post_quant_conv", vae.post_quant_conv, latent_in, decoder_input)
    _decoder(g, vae.decoder, decoder_input)
    for name, module in vae.named_modules():
        if id(module) not in g.covered and type(module) is not nn.ModuleList:
            raise refuse(name, module, "a module outside the layout this transform knows")
    return g
