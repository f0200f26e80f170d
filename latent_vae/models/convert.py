"""Original latent-diffusion (LDM) autoencoder checkpoints -> diffusers AutoencoderKL folders.

CompVis' `kl-f4/f8/f16/f32` autoencoders and LightningDiT's VA-VAE are stored in LDM's own layout
(`encoder.down.{i}.block.{j}`, attention as 1x1 convolutions at some levels), which diffusers' loaders do
not read. `convert_checkpoint` reads such a checkpoint without running any code from it, works out (or
reads from LDM's yaml) the architecture, maps every weight onto diffusers' `AutoencoderKL` with
`AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` at the attention levels, and writes a diffusers folder
(and optionally a single `.safetensors` file) through `latent_vae.models.loading`.

This is the only place in the package that reads a pickle; `load_vae` keeps refusing them.
"""

from __future__ import annotations

import os
import pickle
import re
import types
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils import option_values as values
from ..utils.errors import ConvertError, one_line
from ..utils.file_boundary import reading
from .normalization import LatentNormalization

# LDM's Normalize() is GroupNorm(32, C, eps=1e-6) everywhere: the group count is not in the weights.
LDM_NORM_GROUPS = 32
AUTOENCODER_MODULES = ("encoder", "decoder", "quant_conv", "post_quant_conv")
EMA_MODULE = "model_ema"  # LDM's LitEma: a buffer per weight, named without its dots (encoderconv_inweight)
ANCHOR_KEY = "encoder.conv_in.weight"  # present in every LDM autoencoder; finds the autoencoder's key prefix


# -- reading checkpoints without running their code -----------------------------------------------------


class _Inert:
    """Stands in for every object of a checkpoint that is not a tensor (Lightning callbacks, hyper-parameters,
    optimiser classes, and any `__reduce__` payload): built from nothing, it runs nothing and keeps nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _Inert:
        return _Inert()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass


# The globals a pickled state dict needs, and nothing that can run code: tensor rebuilders, OrderedDict,
# torch.Size and dtypes. Storage classes are resolved by torch.load itself before `find_class` is asked.
_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
}


def _restricted_pickle_module(skipped: Counter) -> types.ModuleType:
    """A stand-in for the `pickle` module, for `torch.load(pickle_module=...)`: every global outside the
    allow-list becomes an `_Inert` class (its name counted in `skipped`), so no constructor, `__reduce__`
    or `__setstate__` chosen by the file ever runs."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) in _TENSOR_GLOBALS or is_dtype:
                return super().find_class(module, name)
            skipped[f"{module}.{name}"] += 1
            return _Inert

    restricted = types.ModuleType("latent_vae_restricted_pickle")
    restricted.Unpickler = RestrictedUnpickler
    restricted.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    restricted.UnpicklingError = pickle.UnpicklingError
    return restricted


@dataclass
class LoadedCheckpoint:
    tensors: dict[str, torch.Tensor]
    reader: str  # how it was read: safetensors, torch (weights_only) or torch (restricted unpickler)
    skipped_objects: Counter = field(default_factory=Counter)  # non-tensor globals replaced by inert stand-ins


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """The tensors of a `.safetensors` file, a plain state dict (`.pt`/`.pth`) or a Lightning `.ckpt`.

    Pickles are read with `torch.load(weights_only=True)`; when that refuses a Lightning checkpoint's other
    objects, with an unpickler that turns every non-tensor global into an inert placeholder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # safe_open has no __iter__
                return LoadedCheckpoint({key: f.get_tensor(key) for key in names}, "safetensors")
        except Exception as error:  # a truncated or foreign file: whatever the reader raised, say it in one line
            raise ConvertError(f"{path}: not a readable .safetensors file ({one_line(error, with_type=True, limit=120)})") from None
    if _is_torchscript(path):  # torch.load(weights_only=False) would hand it to torch.jit.load
        raise ConvertError(f"{path}: a TorchScript archive (a program), not a checkpoint of weights")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        reader, skipped = "torch (weights_only)", Counter()
    except pickle.UnpicklingError:
        # Refused (a Lightning checkpoint's callbacks and hyper-parameters), or not a pickle at all: retry with
        # the restricted unpickler, which reads the tensors and builds nothing else.
        skipped = Counter()
        try:
            restricted = _restricted_pickle_module(skipped)
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
        except Exception as error:
            raise ConvertError(f"{path}: truncated, or not a PyTorch checkpoint ({one_line(error, with_type=True, limit=120)})") from None
        reader = "torch (restricted unpickler)"
    except Exception as error:  # truncated zip, wrong magic number, ...
        raise ConvertError(f"{path}: truncated, or not a PyTorch checkpoint ({one_line(error, with_type=True, limit=120)})") from None
    return LoadedCheckpoint(_state_dict_of(loaded, path), reader, skipped)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    # is_zipfile only finds an end record: random bytes ending in one are no archive (BadZipFile, one line)
    with reading(path, "zip archive (PyTorch checkpoint)", ConvertError), zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _state_dict_of(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a Lightning checkpoint's `state_dict`, else the top-level dict."""
    if not isinstance(loaded, dict):
        raise ConvertError(f"{path}: holds a {type(loaded).__name__}, not a state dict or a Lightning checkpoint")
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    # detach(): fresh tensor objects, without any backward hooks the pickle attached to the ones it built
    return {key: value.detach() for key, value in loaded.items()
            if isinstance(key, str) and isinstance(value, torch.Tensor)}


# -- the architecture ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LDMArchitecture:
    """An LDM autoencoder's `ddconfig` (plus `embed_dim`), in the terms diffusers' AutoencoderKL can express."""

    block_out_channels: tuple[int, ...]  # ch * ch_mult
    layers_per_block: int  # LDM's num_res_blocks (the decoder has one more per level, in both layouts)
    latent_channels: int  # z_channels == embed_dim
    encoder_attention_levels: tuple[int, ...] = ()  # LDM level indices (0 = full resolution) with attention
    decoder_attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    resolution: int = 256  # LDM's training resolution (diffusers' sample_size); attention levels follow from it

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def diffusers_config(self) -> dict:
        """Keyword arguments for `AutoencoderKL(**config)`; diffusers' up blocks run from the lowest level up."""
        levels = self.levels
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=tuple("AttnDownEncoderBlock2D" if i in self.encoder_attention_levels
                                   else "DownEncoderBlock2D" for i in range(levels)),
            up_block_types=tuple("AttnUpDecoderBlock2D" if levels - 1 - k in self.decoder_attention_levels
                                 else "UpDecoderBlock2D" for k in range(levels)),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=LDM_NORM_GROUPS,
            act_fn="silu",
            sample_size=self.resolution,
            mid_block_add_attention=self.mid_attention,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            # Not in an LDM checkpoint: measured afterwards with `latent-vae calibrate`. Start neutral.
            **LatentNormalization().to_config(),
        )

    def describe(self) -> str:
        ch = self.block_out_channels[0]
        ch_mult = tuple(c // ch for c in self.block_out_channels)
        factor = 2 ** (self.levels - 1)
        encoder, decoder = list(self.encoder_attention_levels), list(self.decoder_attention_levels)
        return (f"ch {ch}, ch_mult {ch_mult}, {self.layers_per_block} res blocks per level, attention at levels "
                f"{encoder} of the encoder and {decoder} of the decoder (level i works at 1/2**i of the image side)"
                f"{' and in the mid blocks' if self.mid_attention else ', none in the mid blocks'}, "
                f"z_channels {self.latent_channels}: f{factor}, {self.in_channels}xHxW -> "
                f"{self.latent_channels}x(H/{factor})x(W/{factor})")


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> LDMArchitecture:
    """The architecture from the weights' names and shapes (LDM autoencoder keys, prefix removed)."""
    keys = set(state_dict)

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise ConvertError(f"missing autoencoder key {key!r}: not an LDM autoencoder, or an incomplete one")
        return state_dict[key].shape

    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ConvertError(f"no encoder levels encoder.down.0, encoder.down.1, ... (found {levels})")
    widths = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels)
    blocks = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    z_double = shape("encoder.conv_out.weight")[0]
    if shape("encoder.conv_in.weight")[0] != widths[0]:
        raise ConvertError(f"encoder.conv_in has {shape('encoder.conv_in.weight')[0]} channels but level 0 has "
                           f"{widths[0]}: diffusers' AutoencoderKL needs ch_mult[0] == 1")
    latent_channels = shape("post_quant_conv.weight")[1] if "post_quant_conv.weight" in keys else z_double // 2
    if "quant_conv.weight" in keys and shape("quant_conv.weight")[0] != z_double:
        raise ConvertError(f"quant_conv maps {z_double} to {shape('quant_conv.weight')[0]} channels: embed_dim != "
                           "z_channels, which diffusers' AutoencoderKL cannot express")
    if z_double != 2 * latent_channels:
        raise ConvertError(f"encoder.conv_out has {z_double} channels for {latent_channels} latent channels: "
                           "not a KL autoencoder with double_z")
    return LDMArchitecture(
        block_out_channels=widths,
        layers_per_block=len(blocks),
        latent_channels=latent_channels,
        encoder_attention_levels=tuple(_indices(keys, r"encoder\.down\.(\d+)\.attn\.")),
        decoder_attention_levels=tuple(_indices(keys, r"decoder\.up\.(\d+)\.attn\.")),
        mid_attention=any(k.startswith("encoder.mid.attn_1.") for k in keys),
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        use_quant_conv="quant_conv.weight" in keys,
        use_post_quant_conv="post_quant_conv.weight" in keys,
    )


def read_ddconfig(path: str | os.PathLike) -> LDMArchitecture:
    """The architecture from LDM's yaml (`model.params.ddconfig` and `embed_dim`), or a bare ddconfig (yaml/JSON)."""
    import yaml  # PyYAML: installed with accelerate and huggingface_hub

    path = Path(path)
    with reading(path, "yaml file", ConvertError):
        config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: expected a mapping with model.params.ddconfig")
    params = config.get("model", {}).get("params", config) if isinstance(config.get("model"), dict) else config
    dd = params.get("ddconfig", params) if isinstance(params, dict) else None
    if not isinstance(dd, dict):
        raise ConvertError(f"{path}: model.params.ddconfig must be a mapping, got {type(dd).__name__}")
    needed = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
    missing = [name for name in needed if name not in dd]
    if missing:
        raise ConvertError(f"{path}: ddconfig has no {', '.join(missing)} (expected LDM's model.params.ddconfig)")
    if not dd.get("double_z", True):
        raise ConvertError(f"{path}: double_z is false: not a KL autoencoder")
    if dd.get("tanh_out") or dd.get("give_pre_end") or dd.get("resamp_with_conv", True) is False:
        raise ConvertError(f"{path}: tanh_out, give_pre_end or resamp_with_conv: false has no diffusers equivalent")
    if not str(dd.get("attn_type", "vanilla")).startswith("vanilla"):
        raise ConvertError(f"{path}: attn_type {dd['attn_type']!r}: only LDM's vanilla attention maps to diffusers")
    embed_dim = params.get("embed_dim", dd["z_channels"])
    if embed_dim != dd["z_channels"]:
        raise ConvertError(f"{path}: embed_dim {embed_dim} != z_channels {dd['z_channels']}, which diffusers' "
                           "AutoencoderKL cannot express")
    dd = _checked_ddconfig(dd, path)
    if dd["ch_mult"][0] != 1:
        raise ConvertError(f"{path}: ch_mult {dd['ch_mult']}: diffusers' AutoencoderKL needs ch_mult[0] == 1")
    resolution = dd["resolution"]
    attention = tuple(i for i in range(len(dd["ch_mult"])) if resolution // 2**i in set(dd["attn_resolutions"]))
    return LDMArchitecture(
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"],
        encoder_attention_levels=attention,
        decoder_attention_levels=attention,
        in_channels=dd.get("in_channels", 3),
        out_channels=dd.get("out_ch", 3),
        resolution=resolution,
    )


# A ddconfig's numbers: widths and counts an AutoencoderKL can be built with (a negative or huge width would
# reach torch as "negative dimension", or allocate without bound).
_WIDTH, _COUNT = values.Integer(1, 1 << 16), values.Integer(1, 64)
_DDCONFIG_NUMBERS = {"ch": _WIDTH, "z_channels": _WIDTH, "in_channels": _WIDTH, "out_ch": _WIDTH,
                     "num_res_blocks": _COUNT, "resolution": values.Integer(1, 1 << 20)}


def _checked_ddconfig(dd: dict, path: Path) -> dict:
    """The ddconfig's numbers as ints in their ranges; a bad one is a ConvertError naming the file and the field."""
    checked = dict(dd)
    try:
        for name, parse in _DDCONFIG_NUMBERS.items():
            if name in dd:
                checked[name] = parse(dd[name])
        for name, parse in (("ch_mult", _COUNT), ("attn_resolutions", values.Integer(1, 1 << 20))):
            if not isinstance(dd[name], (list, tuple)) or (name == "ch_mult" and not dd[name]):
                raise values.BadValue(f"must be a list of integers, got {dd[name]!r}")
            checked[name] = [parse(v) for v in dd[name]]
    except values.BadValue as error:
        raise ConvertError(f"{path}: ddconfig {name} {error}") from None
    widths = [checked["ch"] * m for m in checked["ch_mult"]]
    if any(w % LDM_NORM_GROUPS for w in widths):
        raise ConvertError(f"{path}: ddconfig ch * ch_mult = {widths}: LDM's GroupNorm needs multiples of "
                           f"{LDM_NORM_GROUPS}")
    return checked


# -- key mapping -----------------------------------------------------------------------------------------------

_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UP_BLOCK_PARTS = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}


def ldm_key(diffusers_key: str, levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL weight. LDM's decoder.up list is indexed by level (up.0 is the
    full resolution, applied last), diffusers' up_blocks in the order they run."""
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.",
                 lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", diffusers_key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{_UP_BLOCK_PARTS[m[2]]}.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".attn" in key:
        key = re.sub(r"\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
                     lambda m: f".{_ATTENTION_NAMES[m[1]]}.{m[2]}", key)
    return key


def _fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` as `shape`: equal, or LDM's 1x1-conv attention weight [C, C, 1, 1] for a Linear's [C, C]."""
    if tensor.shape == shape:
        return tensor
    if tensor.dim() == 4 and len(shape) == 2 and tensor.shape[2:] == (1, 1) and tensor.shape[:2] == shape:
        return tensor[:, :, 0, 0]
    return None


@dataclass
class Conversion:
    """What `convert_checkpoint` did: printed by `latent-vae convert`."""

    architecture: LDMArchitecture
    folder: Path
    single_file: Path | None
    converted: int  # autoencoder tensors mapped
    ignored: dict[str, int]  # other tensors (loss, discriminator, alignment heads, ...) by top-level name
    reader: str
    skipped_objects: dict[str, int]
    prefix: str
    ema: str  # "converted" (use_ema), "present" (the checkpoint has EMA weights, not used) or "none"


def _autoencoder_prefix(keys, prefix: str | None) -> str:
    if prefix is not None:
        if not any(k.startswith(prefix + ANCHOR_KEY) for k in keys):
            raise ConvertError(f"no autoencoder under prefix {prefix!r} (no key {prefix + ANCHOR_KEY!r})")
        return prefix
    found = sorted(k[: -len(ANCHOR_KEY)] for k in keys if k.endswith(ANCHOR_KEY))
    found = [p for p in found if p == "" or p.endswith(".")]
    if not found:
        raise ConvertError(f"no LDM autoencoder weights (no key {ANCHOR_KEY!r}, with or without a prefix such as "
                           "'first_stage_model.')")
    if "" in found:
        return ""
    if len(found) > 1:
        raise ConvertError(f"several autoencoders in this checkpoint (prefixes {found}): pick one with --prefix")
    return found[0]


def to_diffusers(state_dict: dict[str, torch.Tensor], architecture: LDMArchitecture):
    """An AutoencoderKL holding the LDM weights (fp32); every autoencoder key must be used and have its shape."""
    from diffusers import AutoencoderKL

    try:
        with torch.device("meta"):  # no random initialisation of weights that are about to be replaced
            vae = AutoencoderKL(**architecture.diffusers_config())
    except (ValueError, TypeError, RuntimeError) as error:  # widths torch or diffusers cannot build
        raise ConvertError(f"the architecture cannot be built ({one_line(error, limit=120)}): "
                           f"{architecture.describe()}") from None
    converted, used = {}, set()
    for name, target in vae.state_dict().items():
        source = ldm_key(name, architecture.levels)
        if source not in state_dict:
            raise ConvertError(f"missing autoencoder key {source!r} (diffusers {name}) for the architecture: "
                               f"{architecture.describe()}")
        fitted = _fit(state_dict[source], target.shape)
        if fitted is None:
            raise ConvertError(f"autoencoder key {source!r} has shape {tuple(state_dict[source].shape)}, expected "
                               f"{tuple(target.shape)} for the architecture: {architecture.describe()}")
        converted[name] = fitted.to(torch.float32).contiguous()
        used.add(source)
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConvertError(f"autoencoder key {unexpected[0]!r}{more} has no place in the architecture "
                           f"({architecture.describe()}): a variant this converter does not know")
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae.eval()


def convert_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    single_file: str | os.PathLike | None = None,
    prefix: str | None = None,
    use_ema: bool = False,
) -> Conversion:
    """Convert an LDM-layout autoencoder checkpoint into a diffusers folder (and a single file if asked).

    Args:
        source: a Lightning `.ckpt`, a plain state dict (`.pt`/`.pth`) or a `.safetensors` file.
        out_dir: the diffusers model folder to write (config.json + safetensors).
        config: LDM's yaml (`model.params.ddconfig` + `embed_dim`); by default the architecture is inferred.
        single_file: also write one `.safetensors` file with the config in its metadata.
        prefix: the autoencoder's key prefix (e.g. `first_stage_model.` in a whole LDM); found by default.
        use_ema: convert the EMA weights that LDM's `LitEma` keeps under `model_ema.` (names without dots)
            instead of the raw ones.
    """
    try:
        return _convert(source, out_dir, config, single_file, prefix, use_ema)
    except ConvertError as error:  # every message names what it is about: the checkpoint unless it names a file
        named = str(error).startswith((str(source), str(config))) if config else str(error).startswith(str(source))
        raise error if named else ConvertError(f"{source}: {error}") from None


def _convert(source, out_dir, config, single_file, prefix, use_ema) -> Conversion:
    from ..utils.atomic import atomic_directory
    from .loading import save_single_file, save_vae

    loaded = read_checkpoint(source)
    prefix = _autoencoder_prefix(loaded.tensors, prefix)
    autoencoder, ignored = {}, Counter()
    for key, tensor in loaded.tensors.items():
        local = key[len(prefix):] if key.startswith(prefix) else None
        if local is not None and local.split(".")[0] in AUTOENCODER_MODULES:
            autoencoder[local] = tensor
        else:
            ignored[key.split(".")[0]] += 1
    ema_prefix = prefix + EMA_MODULE + "."
    ema = {k[len(ema_prefix):]: v for k, v in loaded.tensors.items() if k.startswith(ema_prefix)}
    if use_ema:
        if not ema:
            raise ConvertError(f"{source}: no EMA weights (no {ema_prefix}* keys) to convert")
        missing = [k for k in autoencoder if k.replace(".", "") not in ema]
        if missing:
            wanted = ema_prefix + missing[0].replace(".", "")
            raise ConvertError(f"{source}: no EMA weight {wanted!r} for {missing[0]!r}")
        autoencoder = {k: ema[k.replace(".", "")] for k in autoencoder}
    architecture = read_ddconfig(config) if config else infer_architecture(autoencoder)
    vae = to_diffusers(autoencoder, architecture)
    folder = Path(out_dir)
    with atomic_directory(folder) as tmp:  # never a half-written model folder, never a file replaced by one
        save_vae(vae, tmp)
    written = save_single_file(vae, single_file) if single_file else None
    return Conversion(architecture, folder, written, len(autoencoder), dict(sorted(ignored.items())),
                      loaded.reader, dict(loaded.skipped_objects), prefix,
                      "converted" if use_ema else "present" if ema else "none")
