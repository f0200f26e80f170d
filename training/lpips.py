"""LPIPS (VGG16) in plain torch, weights from a local .safetensors file: no torchvision, no download.

The layer layout and indices are torchvision's `vgg16().features`, the heads are LPIPS v0.1's, so the
official weights convert key for key:

    python -m training.lpips --vgg vgg16-397923af.pth --lin lpips/weights/v0.1/vgg.pth --out lpips_vgg16.safetensors

(`--vgg` defaults to torch hub's cache file, `--lin` to the `lpips` package's file, when they exist.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# torchvision's VGG16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` after which LPIPS taps activations: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input scaling (inputs in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

DEFAULT_WEIGHTS = Path(os.environ.get("LATENT_VAE_LPIPS", "~/.cache/latent-vae/lpips_vgg16.safetensors")).expanduser()
TORCH_HUB_VGG = Path("~/.cache/torch/hub/checkpoints/vgg16-397923af.pth").expanduser()


class LPIPSWeightsMissing(FileNotFoundError):
    pass


def missing_weights_message(path: Path) -> str:
    return (
        f"LPIPS is on (lpips_weight > 0) but there are no LPIPS weights at {path}: convert the official VGG16 and "
        "LPIPS v0.1 files with `python -m training.lpips --out FILE.safetensors` and pass --lpips_weights FILE "
        "(or set LATENT_VAE_LPIPS), or turn the perceptual term off with --lpips_weight 0"
    )


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Learned perceptual distance: two float Nx3xHxW images in [-1, 1] -> N distances (lower is closer).

    Its own weights are frozen, but it is differentiable in its inputs: the loss gradient reaches the VAE.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> LPIPS:
        path = Path(path).expanduser() if path else DEFAULT_WEIGHTS
        if not path.is_file():
            raise LPIPSWeightsMissing(missing_weights_message(path))
        model = cls()
        model.load_state_dict(load_file(str(path)), strict=True)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always inference behaviour, even inside a module put in train mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                out.append(x)
                if index == TAPS[-1]:
                    break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(a.dtype)
        shift = self.shift.to(a.dtype)
        taps_a, taps_b = self._taps((a - shift) / scale), self._taps((b - shift) / scale)
        total = 0.0
        for lin, fa, fb in zip(self.lins, taps_a, taps_b):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)  # unit-normalised channels, as LPIPS
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def convert(vgg_file: Path, lin_file: Path, out: Path) -> Path:
    """Official torchvision VGG16 + LPIPS v0.1 heads (pickled state dicts) -> one .safetensors file."""
    # weights_only=True: only tensors and containers are unpickled, never code.
    vgg = torch.load(vgg_file, map_location="cpu", weights_only=True)
    lin = torch.load(lin_file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in vgg.items() if k.startswith("features.")}
    state.update({f"lins.{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(TAP_CHANNELS))})
    LPIPS().load_state_dict(state, strict=True)  # fails here, not in a training run, if a key is off
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def _lpips_package_file() -> Path | None:
    try:
        import lpips
    except ImportError:
        return None
    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.lpips", description=convert.__doc__)
    parser.add_argument("--vgg", type=Path, default=TORCH_HUB_VGG, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--lin", type=Path, default=_lpips_package_file(), help="LPIPS v0.1 vgg.pth")
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)
    for name, path in (("--vgg", args.vgg), ("--lin", args.lin)):
        if path is None or not Path(path).is_file():
            parser.error(f"{name}: file {path} not found")
    print(convert(args.vgg, args.lin, args.out))


if __name__ == "__main__":
    main()
