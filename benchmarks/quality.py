"""What latent space costs: reconstruction fidelity of a VAE over an image folder, beside a bicubic baseline.

The baseline keeps as many numbers as the latent does: each image is shrunk (bicubic, antialiased) until
3 x h x w equals the latent's C x H/f x W/f values, then enlarged back. A VAE that does not beat it has
learnt less than plain resampling at the same compression.

PSNR and SSIM always; LPIPS (VGG) when its converted weights exist locally (`python -m training.lpips`);
rFID is not computed: torchmetrics' FID needs Inception weights that are downloaded, and 68 images
are too few for a meaningful FID anyway.

    python -m benchmarks.quality --model path/to/vae --images $LATENT_VAE_PHOTOS/cbsd68
    python -m benchmarks.quality --model path/to/vae --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.measure import add_device_args, device_and_dtype, result_name
from benchmarks.report import device_label, photo_folder, save_figure, write_results
from latent_vae import LatentCodec, load_vae
from latent_vae.images.metrics import bicubic_equal_values, psnr, ssim
from latent_vae.images.reading import find_images, load_image, pil_to_tensor
from latent_vae.models.residual import untrained_code_model

NAME = "quality"


def load_lpips(device: torch.device):
    """The project's LPIPS (VGG16) if its weights exist locally, else None (never downloads)."""
    try:
        from training.lpips import DEFAULT_WEIGHTS, LPIPS, LPIPSWeightsMissing
    except ImportError:
        return None, "not computed (training.lpips is not importable)"
    try:
        return LPIPS.from_file().to(device), "VGG16 LPIPS v0.1"
    except LPIPSWeightsMissing:
        return None, f"not computed: no local weights at {DEFAULT_WEIGHTS} (make them with `python -m training.lpips`)"


def main(args: argparse.Namespace) -> None:
    device, dtype = device_and_dtype(args)
    vae = load_vae(args.model, seed=0)
    trained = Path(args.model).exists()
    codec = LatentCodec(vae, device=device, dtype=dtype, tile_size=args.tile_size)
    # A shortcut model starts as its parameter-free code: score that too, to show what training added.
    code_model = untrained_code_model(vae) if trained else None
    code_codec = LatentCodec(code_model, device=device, dtype=dtype, tile_size=args.tile_size) if code_model else None
    paths = find_images(args.images)[: args.max_images]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    lpips, lpips_note = load_lpips(device)
    results: dict[str, dict[str, list[float]]] = {"vae": {}, "bicubic": {}}
    if code_codec is not None:
        results["code"] = {}
    examples = []
    for index, path in enumerate(paths):
        image = pil_to_tensor(load_image(path))
        height, width = image.shape[-2:]
        encoded = codec.encode(image, return_dict=True)
        recon = codec.decode(encoded.latents, image_size=encoded.image_size).cpu()[0]
        # The latent of the padded image is what is stored: count its values, padding included.
        values = encoded.latents[0].numel()
        baseline = bicubic_equal_values(image, values)
        outputs = {"vae": recon, "bicubic": baseline}
        if code_codec is not None:
            outputs["code"] = code_codec.decode(code_codec.encode(image), image_size=encoded.image_size).cpu()[0]
        for method, output in outputs.items():
            metrics = results[method]
            metrics.setdefault("psnr", []).append(float(psnr(image[None], output[None])))
            metrics.setdefault("ssim", []).append(float(ssim(image[None], output[None])))
            if lpips is not None:
                with torch.no_grad():
                    distance = lpips(image[None].to(device), output[None].to(device))
                metrics.setdefault("lpips", []).append(float(distance))
            metrics.setdefault("compression", []).append(3 * height * width / values)
        if index < 3:
            examples.append((path.name, image, recon, baseline))
        print(f"{path.name}: vae {results['vae']['psnr'][-1]:.2f} dB, bicubic {results['bicubic']['psnr'][-1]:.2f} dB",
              flush=True)

    label = {"vae": f"VAE `{args.model}`" + ("" if trained else " (fresh, UNTRAINED weights)"),
             "bicubic": "bicubic down+up, equal values",
             "code": f"its untrained {getattr(vae.config, 'shortcut', '')} shortcut code (zero-init, no training)"}
    rows = []
    for method, metrics in results.items():
        row = {"method": label[method], "images": len(paths),
               "compression (pixel values / kept values)": statistics.mean(metrics["compression"]),
               "PSNR dB": statistics.mean(metrics["psnr"]), "SSIM": statistics.mean(metrics["ssim"])}
        row["LPIPS"] = statistics.mean(metrics["lpips"]) if "lpips" in metrics else "-"
        rows.append(row)
    wins = sum(v > b for v, b in zip(results["vae"]["psnr"], results["bicubic"]["psnr"]))
    if "code" in results:
        over_code = sum(v > c for v, c in zip(results["vae"]["psnr"], results["code"]["psnr"]))
        wins = f"{wins} of {len(paths)} images, and its untrained code's on {over_code}"
    else:
        wins = f"{wins} of {len(paths)} images"
    notes = (
        f"Images: {args.images} ({len(paths)}), full size (padded to the VAE's factor, cropped back). "
        f"{device_label(device)}, {str(dtype).replace('torch.', '')}. The VAE beats the baseline's PSNR on "
        f"{wins}. LPIPS: {lpips_note}. "
        "rFID: not computed (needs downloaded Inception weights; 68 images are too few for FID). "
        "Reference points: LDM kl-f16 on ImageNet val PSNR 24.08, SSIM 0.68."
    )
    write_results(result_name(NAME, device), rows, notes=notes, extra={"args": {k: str(v) for k, v in vars(args).items()},
                                                  "per_image": {m: results[m] for m in results},
                                                  "images": [p.name for p in paths]})
    plot(results, examples, label, device)


def plot(results, examples, label, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(3, len(examples))
    fig = plt.figure(figsize=(4 * columns, 3.2 * (1 + len(examples))))
    grid = fig.add_gridspec(1 + len(examples), columns)
    for i, metric in enumerate(("psnr", "ssim")):
        ax = fig.add_subplot(grid[0, i])
        ax.scatter(results["bicubic"][metric], results["vae"][metric], s=10)
        low = min(results["bicubic"][metric] + results["vae"][metric])
        high = max(results["bicubic"][metric] + results["vae"][metric])
        ax.plot([low, high], [low, high], color="gray", linestyle=":")
        ax.set(xlabel=f"bicubic {metric.upper()}", ylabel=f"VAE {metric.upper()}", title=f"per image {metric.upper()}")
    for row, (name, image, recon, baseline) in enumerate(examples, start=1):
        for col, (title, tensor) in enumerate((("original " + name, image), (label["vae"], recon),
                                                (label["bicubic"], baseline))):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(tensor.permute(1, 2, 0).add(1).div(2).clamp(0, 1).numpy())
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    save_figure(fig, result_name(NAME, device), dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--model", default="f16c16-narrow",
                        help="a trained model folder or .safetensors (a preset name gives untrained weights)")
    parser.add_argument("--images", default=str(photo_folder() / "cbsd68"), help="image folder (default: $LATENT_VAE_PHOTOS/cbsd68)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--tile-size", type=int, default=None, help="LatentCodec tiling (default: none)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
