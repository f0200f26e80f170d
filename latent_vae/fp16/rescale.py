"""fp16 that never overflows: rescale a KL-VAE by powers of two, stage by stage, into fp16's range, same function.

fp16 overflow (inf, then NaN: black images) is a property of a model's weights, not of its function. In diffusers'
AutoencoderKL every tensor of the residual stream, and of each resnet's inner branch, reaches a nonlinearity only
through a GroupNorm, and GroupNorm(a * x, eps * a**2) == GroupNorm(x, eps) for any a > 0. So each stage of the
stream (`latent_vae.fp16.layout` works out which tensors must share a scale) can be carried at its own scale:
multiply the weights that write it and divide those that read it. With powers of two every multiplication is
exact in floating point, so the fixed model computes the source's function, in fp32 up to rounding.

`fp16_safe(vae, samples)` runs the model in fp32 on calibration images (the decoder on their latents), records
the largest magnitude of every stage with forward hooks, and scales down each stage whose peak is above
65504 / headroom to at most that. The default headroom is 32x (a peak of at most 2047): a stage's peak is a
maximum over pixels, so larger images and other content than the calibration's reach higher (GroupNorm's
statistics and attention see the whole image), and fp16 convolutions sum many products before rounding. Stages
are only ever scaled down: fp16's relative precision is the same across its range, so a stage that fits gains
nothing from moving, and a model that already fits comes back unchanged. The posterior moments (the latent), the
decoder's input and the decoded image are never scaled, nor attention's queries, keys and values; if one of them
overflows fp16 the model is refused (one above the limit but inside fp16 is a warning in the report), as is any
layer the transform cannot prove scale-invariant.

The scaled GroupNorm eps values are recorded in the config (`latent_vae.models.loading.GROUPNORM_EPS_KEY`; a private
key, which diffusers keeps through save and load and passes to no constructor), and `load_vae` applies them: exact.
Plain `AutoencoderKL.from_pretrained` builds every GroupNorm with eps 1e-6; the report bounds what that changes
(`plain_load_eps_error`, a relative change of the normalised values). The config also records the source's
fingerprint (`latent_vae.models.loading.LINEAGE_KEY`), so latents made by the source are accepted by the fixed model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..images.reading import check_image_tensor, pad_to_multiple
from ..models.loading import (
    GROUPNORM_EPS_KEY,
    function_fingerprints,
    model_fingerprint,
    record_lineage,
    save_vae,
)
from ..models.presets import downsampling_factor
from ..utils.atomic import atomic_directory
from ..utils.errors import Fp16FixError
from .layout import FIXED, Stage, StageGraph, is_power_of_two, stage_graph

__all__ = ["DEFAULT_HEADROOM", "FP16_MAX", "Fp16FixError", "Fp16Report", "fp16_safe", "save_fp16_safe",
           "stage_graph"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).tiny)  # 2**-14: below it fp16 loses bits
DEFAULT_HEADROOM = 32.0
REPORT_FILE = "fp16_fix.json"


@dataclass
class Fp16Report:
    """What `fp16_safe` measured and did, stage by stage."""

    stages: list[Stage]
    headroom: float
    images: int  # calibration images seen
    largest_image: tuple[int, int]  # (H, W) of the largest, after padding to the downsampling factor
    source_fingerprint: str
    fingerprint: str  # of the fixed model (the source's when nothing changed)
    plain_load_eps_error: float  # bound on the relative change of a normalised value with GroupNorm eps 1e-6
    weights_below_fp16_normal: tuple[int, int]  # rescaled layers' weights under 2**-14 in magnitude: before, after
    weights: int  # weights in the rescaled layers

    @property
    def limit(self) -> float:
        return FP16_MAX / self.headroom

    @property
    def changed(self) -> bool:
        return any(stage.factor != 1 for stage in self.stages)

    @property
    def tight(self) -> list[Stage]:
        """Fixed stages that fit fp16 but peak above the limit: the transform may not rescale them."""
        return [stage for stage in self.stages if stage.peak_after > self.limit]

    def table(self) -> str:
        """The per-stage table the CLI prints: peaks before and after against fp16's largest value."""
        header = ("stage", "kind", "peak before", "peak after", "after/65504", "factor")
        rows = [(stage.label, stage.kind, _peak(stage.peak_before), _peak(stage.peak_after),
                 f"{stage.peak_after / FP16_MAX:.2%}", _power(stage.factor)) for stage in self.stages]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
        return "\n".join(lines)

    def summary(self) -> str:
        over = sum(stage.peak_before > FP16_MAX for stage in self.stages)
        moved = sum(stage.factor != 1 for stage in self.stages)
        before, after = self.weights_below_fp16_normal
        return (f"{self.images} calibration image(s), largest {self.largest_image[0]}x{self.largest_image[1]}; "
                f"{over} of {len(self.stages)} stages overflowed fp16 before, {moved} rescaled so that every stage "
                f"peaks at most {self.limit:.0f} (65504 / headroom {self.headroom:g}); "
                f"weights under fp16's smallest normal {before} -> {after} of {self.weights}; "
                f"loaded without the recorded eps (plain diffusers) a normalised value moves at most "
                f"{self.plain_load_eps_error:.1e} (relative)"
                + "".join(f"; warning: {stage.label} ({stage.fixed_because}) peaks at {stage.peak_after:.3g}, inside "
                          "fp16 but above the limit, and cannot be rescaled" for stage in self.tight))

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": [{**asdict(s), "label": s.label} for s in self.stages],
                "limit": self.limit, "fp16_max": FP16_MAX}


def _peak(value: float) -> str:
    return f"{value:.3g}" + (" (overflows)" if value > FP16_MAX else "")


def _power(factor: float) -> str:
    return "1" if factor == 1 else f"2^{math.frexp(factor)[1] - 1}"


# -- measuring -------------------------------------------------------------------------------------------------


class _Recorder:
    """Forward hooks on every watched module: the largest |value| of each, and the smallest group variance at
    each GroupNorm's input (for the eps bound), all in fp32."""

    def __init__(self, graph: StageGraph) -> None:
        self.peaks = [-1.0] * len(graph.watches)  # -1: never ran
        norm_of = {id(norm): norm for _, norm, _ in graph.norms}
        self.min_variance: dict[int, float] = {}
        self.handles = []
        for index, (name, module, _, where) in enumerate(graph.watches):
            if where == "input":
                hook = self._input_hook(index, name, norm_of[id(module)])
                self.handles.append(module.register_forward_pre_hook(hook))
            else:
                self.handles.append(module.register_forward_hook(self._output_hook(index, name)))

    def _record(self, index: int, name: str, tensor: torch.Tensor) -> None:
        low, high = torch.aminmax(tensor.detach())
        peak = max(-low.item(), high.item())
        if not math.isfinite(peak):
            raise Fp16FixError(f"{name}: NaN or inf in fp32 on the calibration images: the model is broken in fp32")
        self.peaks[index] = max(self.peaks[index], peak)

    def _output_hook(self, index: int, name: str):
        return lambda module, args, output: self._record(index, name, output)

    def _input_hook(self, index: int, name: str, norm: torch.nn.GroupNorm):
        def hook(module, args):
            x = args[0]
            self._record(index, name, x)
            variance = x.detach().reshape(x.shape[0], norm.num_groups, -1).var(dim=-1, unbiased=False).amin().item()
            self.min_variance[id(norm)] = min(self.min_variance.get(id(norm), math.inf), variance)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _calibrate(vae: AutoencoderKL, graph: StageGraph, samples: Iterable[torch.Tensor]) -> tuple[_Recorder, int, tuple]:
    """Run encoder and decoder (on the posterior mean) over the samples, calling the modules directly so that no
    patched encode/decode (tiling) hides them from the hooks."""
    factor = downsampling_factor(vae.config.block_out_channels)
    recorder, count, largest = _Recorder(graph), 0, (0, 0)
    device = next(vae.parameters()).device
    try:
        for sample in [samples] if isinstance(samples, torch.Tensor) else samples:
            pixels = pad_to_multiple(check_image_tensor(sample), factor).to(device, torch.float32)
            moments = vae.encoder(pixels)
            if vae.quant_conv is not None:
                moments = vae.quant_conv(moments)
            z = moments.chunk(2, dim=1)[0]
            vae.decoder(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)
            count += len(pixels)
            largest = max(largest, tuple(pixels.shape[-2:]), key=lambda size: size[0] * size[1])
    finally:
        recorder.close()
    if count == 0:
        raise ValueError("fp16_safe needs at least one calibration image")
    silent = [name for (name, *_), peak in zip(graph.watches, recorder.peaks) if peak < 0]
    if silent:
        raise Fp16FixError(f"{silent[0]} never ran on the calibration images: the model's forward is not the one "
                           "this transform knows, so it refuses to rescale it")
    return recorder, count, largest


# -- choosing and applying the factors --------------------------------------------------------------------------


def scale_down_factor(peak: float, limit: float) -> float:
    """The largest power of two <= 1 that brings `peak` to at most `limit` (1 when it fits already)."""
    if peak <= limit:
        return 1.0
    exponent = math.ceil(math.log2(peak / limit))
    while peak * 2.0**-exponent > limit:
        exponent += 1
    while exponent > 1 and peak * 2.0 ** (1 - exponent) <= limit:
        exponent -= 1
    return 2.0**-exponent


def _set_peaks(graph: StageGraph, recorder: _Recorder, limit: float) -> list[Stage]:
    stages = graph.stages()
    for (name, _, slot, _), peak in zip(graph.watches, recorder.peaks):
        stage = graph.stage_of(slot)
        if peak > stage.peak_before or not stage.peak_at:
            stage.peak_before, stage.peak_at = peak, name
    for stage in stages:
        stage.factor = scale_down_factor(stage.peak_before, limit) if stage.free else 1.0
    # A fixed stage that overflows fp16 makes the model unfixable; one that only eats into the headroom is
    # reported (Fp16Report.tight), since fp16 still runs it.
    stuck = [stage for stage in stages if stage.kind == FIXED and stage.peak_before > FP16_MAX]
    if stuck:
        stage = stuck[0]
        raise Fp16FixError(
            f"{stage.label} peaks at {stage.peak_before:.3g} (at {stage.peak_at}), beyond fp16's 65504, and cannot "
            f"be rescaled: it is {stage.fixed_because}"
            + (f" ({len(stuck) - 1} more such stage(s))" if len(stuck) > 1 else ""))
    return stages


def _architecture_eps(vae: AutoencoderKL) -> dict[str, float]:
    """Each GroupNorm's eps as the architecture builds it (what plain diffusers loads), from a weightless copy."""
    with torch.device("meta"):
        fresh = type(vae).from_config(vae.config)
    return {name: m.eps for name, m in fresh.named_modules() if isinstance(m, torch.nn.GroupNorm)}


def _eps_bound(graph: StageGraph, recorder: _Recorder, default_eps: dict[str, float]) -> float:
    """Largest relative change of a normalised value if every GroupNorm had its architecture's eps instead of the
    exact one: |eps - eps_exact| / (2 (variance + eps_exact)), with the smallest group variance measured."""
    bound = 0.0
    for name, norm, reads in graph.norms:
        factor = graph.stage_of(reads).factor
        variance = recorder.min_variance[id(norm)] * factor**2
        bound = max(bound, abs(default_eps[name] - norm.eps) / (2 * (variance + norm.eps)))
    return bound


def _small_weights(graph: StageGraph) -> tuple[int, int]:
    small = total = 0
    for _, layer, _, _ in graph.linears:
        for parameter in layer.parameters():
            magnitude = parameter.detach().abs()
            small += int(((magnitude > 0) & (magnitude < FP16_SMALLEST_NORMAL)).sum())
            total += parameter.numel()
    return small, total


def fp16_safe(vae: AutoencoderKL, samples: Iterable[torch.Tensor] | torch.Tensor, *,
              headroom: float = DEFAULT_HEADROOM) -> Fp16Report:
    """Rescale `vae` in place (fp32, any device) so that every stage peaks at most 65504 / `headroom` on `samples`.

    Args:
        vae: an AutoencoderKL or ResidualAutoencoderKL in float32; anything the transform cannot prove
            scale-invariant is an Fp16FixError naming the layer, before any weight changes.
        samples: calibration images: float Nx3xHxW (or 3xHxW) tensors in [-1, 1], or an iterable of them (sizes may
            differ between tensors; each is padded to the downsampling factor). Wrap it in tqdm for a progress bar.
        headroom: a power of two >= 1: how far below fp16's largest value each stage's calibration peak is put.

    Returns the report; the model's config then records the scaled GroupNorm eps and the source's fingerprint.
    """
    if not (is_power_of_two(headroom) and headroom >= 1):
        raise ValueError(f"headroom must be a power of two >= 1, got {headroom}")
    if vae.dtype != torch.float32:
        raise ValueError(f"fp16_safe calibrates in fp32; got a {vae.dtype} model (load it in fp32)")
    graph = stage_graph(vae)  # refuses unknown layers before anything runs
    source_fingerprints = function_fingerprints(vae)  # its own first
    limit = FP16_MAX / headroom
    was_training = vae.training
    vae.eval()
    try:
        recorder, count, largest = _calibrate(vae, graph, samples)
    finally:
        vae.train(was_training)
    stages = _set_peaks(graph, recorder, limit)  # refuses a fixed stage over the limit, before any change
    small_before, total = _small_weights(graph)
    graph.rescale({stage.name: stage.factor for stage in stages if stage.factor != 1})
    default_eps = _architecture_eps(vae)
    if any(stage.factor != 1 for stage in stages):
        # the exact eps of every GroupNorm that differs from its architecture's, then the lineage (whose record
        # names the fingerprint, which covers the eps)
        eps = {name: norm.eps for name, norm, _ in graph.norms if norm.eps != default_eps[name]}
        vae.register_to_config(**{GROUPNORM_EPS_KEY: eps})
        record_lineage(vae, source_fingerprints)
    return Fp16Report(
        stages=stages, headroom=headroom, images=count, largest_image=largest,
        source_fingerprint=source_fingerprints[0], fingerprint=model_fingerprint(vae),
        plain_load_eps_error=_eps_bound(graph, recorder, default_eps),
        weights_below_fp16_normal=(small_before, _small_weights(graph)[0]), weights=total,
    )


def save_fp16_safe(vae: AutoencoderKL, report: Fp16Report, out_dir: str | os.PathLike) -> Path:
    """The fixed model as a diffusers folder (`latent_vae.models.loading.save_vae`), with the report beside it
    (fp16_fix.json); written to a temporary folder and renamed, so `out_dir` is never half-written."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_vae(vae, tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return out_dir
