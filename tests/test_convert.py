"""`latent-vae convert`: LDM-layout autoencoder checkpoints -> diffusers, checked against an independent LDM.

`LDMAutoencoder` below is written from the latent-diffusion architecture (its own module names, LDM's
state-dict names); random weights stand in for kl-f16, kl-f8 and VA-VAE at narrow width, so nothing is
downloaded. Widths start at 32 because LDM's GroupNorm always has 32 groups.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from helpers import assert_close
from safetensors.torch import save_file
from torch import nn

from latent_vae.cli import main
from latent_vae.models.convert import ConvertError, convert_checkpoint
from latent_vae.models.loading import load_vae

# -- an LDM autoencoder, written from the paper's architecture ---------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class SelfAttention(nn.Module):
    """Single-head attention over all pixels, q/k/v/out as 1x1 convolutions, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(n, c, h * w) for conv in (self.q, self.k, self.v))
        weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / c**0.5, dim=-1)
        out = torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)
        return x + self.proj_out(out)


class Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attention: list[nn.Module]) -> None:
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attention)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Middle(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResBlock(c, c), SelfAttention(c), ResBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class LDMAutoencoder(nn.Module):
    """LDM's AutoencoderKL: encoder.down.{i}, decoder.up.{i} (indexed by level), quant convs, posterior."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution=256) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        levels = len(widths)
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.encoder.down = nn.ModuleList()
        c_in, res = ch, resolution
        for i, c in enumerate(widths):
            attention = res in attn_resolutions
            level = Level([ResBlock(c_in if j == 0 else c, c) for j in range(num_res_blocks)],
                          [SelfAttention(c) for _ in range(num_res_blocks)] if attention else [])
            if i < levels - 1:
                level.downsample = Down(c)
                res //= 2
            self.encoder.down.append(level)
            c_in = c
        self.encoder.mid = Middle(c_in)
        self.encoder.norm_out = group_norm(c_in)
        self.encoder.conv_out = nn.Conv2d(c_in, 2 * z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

        self.decoder.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.decoder.mid = Middle(widths[-1])
        up = {}
        c_in = widths[-1]
        for i in reversed(range(levels)):
            c = widths[i]
            attention = res in attn_resolutions
            level = Level([ResBlock(c_in if j == 0 else c, c) for j in range(num_res_blocks + 1)],
                          [SelfAttention(c) for _ in range(num_res_blocks + 1)] if attention else [])
            if i > 0:
                level.upsample = Up(c)
                res *= 2
            up[i] = level
            c_in = c
        self.decoder.up = nn.ModuleList([up[i] for i in range(levels)])
        self.decoder.norm_out = group_norm(widths[0])
        self.decoder.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def encode(self, x):
        """-> (mean, logvar) of the posterior, logvar clamped as LDM does."""
        h = self.encoder.conv_in(x)
        for level in self.encoder.down:
            h = level(h)
        h = self.encoder.mid(h)
        h = self.encoder.conv_out(F.silu(self.encoder.norm_out(h)))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        h = self.decoder.conv_in(self.post_quant_conv(z))
        h = self.decoder.mid(h)
        for level in reversed(self.decoder.up):
            h = level(h)
        return self.decoder.conv_out(F.silu(self.decoder.norm_out(h)))


# The published architectures at 1/4 width (ch 32: LDM's GroupNorm needs multiples of 32).
ARCHITECTURES = {
    "kl-f16": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=16),
    "kl-f8": dict(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4),
    "vavae-f16d32": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32),
    # attention at two inner levels, with down/upsampling after it (not in a published model: covers the mapping)
    "attn-inner": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(128, 64), z_channels=4),
}


def reference(name: str, seed: int = 0) -> LDMAutoencoder:
    """Random weights, every parameter (norms too) moved off its default so that a wrong mapping shows."""
    torch.manual_seed(seed)
    model = LDMAutoencoder(**ARCHITECTURES[name]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


class CallbackState:
    """Stands for the objects of a Lightning checkpoint that weights_only loading refuses."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor


class RunsCode:
    """A payload whose unpickling creates a marker folder: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def lightning_checkpoint(model: nn.Module, extra_keys: dict[str, torch.Tensor] | None = None, payload=None) -> dict:
    state = {
        **model.state_dict(),
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        **(extra_keys or {}),
    }
    return {
        "epoch": 12, "global_step": 443_000, "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {CallbackState: CallbackState("val/rec_loss"), "payload": payload},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
        "hyper_parameters": CallbackState("embed_dim"),
    }


def assert_matches(model: LDMAutoencoder, vae: AutoencoderKL, size: int = 64) -> None:
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(pixels)
        posterior = vae.encode(pixels).latent_dist
        # Both sides sum in their own order (measured up to 3.5e-6 of the largest value across kernel sets); one
        # decoder GroupNorm left at its default weight moves the decoded values by 3-4e-2 (relative L2).
        assert_close(posterior.mean, mean)
        assert_close(posterior.logvar, logvar)
        z = torch.randn_like(mean)
        assert_close(vae.decode(z).sample, model.decode(z))


# -- conversion matches the reference ---------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_lightning_ckpt_converts_to_a_diffusers_model_that_matches_ldm(name, tmp_path):
    model = reference(name)
    extra = {"linear_proj.weight": torch.randn(768, 32, 1, 1)} if name.startswith("vavae") else None
    torch.save(lightning_checkpoint(model, extra), tmp_path / "model.ckpt")
    result = convert_checkpoint(tmp_path / "model.ckpt", tmp_path / "vae")
    assert result.reader == "torch (restricted unpickler)"  # weights_only refused the Lightning objects
    assert f"{__name__}.CallbackState" in result.skipped_objects
    assert result.converted == len(model.state_dict())
    assert result.ignored == {"loss": 3, **({"linear_proj": 1} if extra else {})}

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")  # plain diffusers loads the folder
    attention_levels = [i for i, b in enumerate(vae.config.down_block_types) if b == "AttnDownEncoderBlock2D"]
    spec = ARCHITECTURES[name]
    assert attention_levels == [i for i in range(len(spec["ch_mult"])) if 256 // 2**i in spec["attn_resolutions"]]
    assert vae.config.latent_channels == spec["z_channels"]
    assert_matches(model, vae)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["kl-f16", "vavae-f16d32"])
def test_safetensors_and_plain_state_dicts_convert_too_with_a_single_file(name, tmp_path):
    model = reference(name, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    for source, reader in (("model.safetensors", "safetensors"), ("model.pth", "torch (weights_only)")):
        out = tmp_path / source.replace(".", "_")
        result = convert_checkpoint(tmp_path / source, out, single_file=out.with_suffix(".safetensors"))
        assert result.reader == reader and result.ignored == {}
        assert_matches(model, load_vae(out.with_suffix(".safetensors")), size=48)  # the single file, odd latent size


@pytest.mark.numerics
def test_ddconfig_yaml_gives_the_architecture(tmp_path):
    spec = ARCHITECTURES["kl-f16"]
    model = reference("kl-f16", seed=5)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "kl-f16.ckpt")
    yaml_text = f"""model:
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    embed_dim: 16
    lossconfig: {{target: ldm.modules.losses.LPIPSWithDiscriminator}}
    ddconfig:
      double_z: true
      z_channels: 16
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: {spec['ch']}
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
"""
    (tmp_path / "config.yaml").write_text(yaml_text)
    result = convert_checkpoint(tmp_path / "kl-f16.ckpt", tmp_path / "vae", config=tmp_path / "config.yaml")
    assert result.architecture.encoder_attention_levels == (4,)
    assert_matches(model, AutoencoderKL.from_pretrained(tmp_path / "vae"), size=32)
    # A yaml that disagrees with the weights is an error naming the first weight that does not fit.
    (tmp_path / "wrong.yaml").write_text(yaml_text.replace("attn_resolutions: [16]", "attn_resolutions: [32]"))
    with pytest.raises(ConvertError, match=r"encoder\.down\.3\.attn\.0\.norm\.weight"):
        convert_checkpoint(tmp_path / "kl-f16.ckpt", tmp_path / "wrong", config=tmp_path / "wrong.yaml")


@pytest.mark.numerics
def test_whole_ldm_checkpoint_finds_the_first_stage_model(tmp_path):
    model = reference("kl-f8")
    state = {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "ldm.ckpt")
    result = convert_checkpoint(tmp_path / "ldm.ckpt", tmp_path / "vae")
    assert result.prefix == "first_stage_model." and result.ignored == {"model": 1}
    assert_matches(model, AutoencoderKL.from_pretrained(tmp_path / "vae"), size=32)


@pytest.mark.numerics
def test_ema_weights_convert_when_asked(tmp_path):
    raw, averaged = reference("attn-inner", seed=0), reference("attn-inner", seed=1)
    # LDM's LitEma keeps one buffer per weight, named without dots, plus its own counters.
    ema = {f"model_ema.{k.replace('.', '')}": v for k, v in averaged.state_dict().items()}
    ema.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    torch.save({"state_dict": {**raw.state_dict(), **ema}}, tmp_path / "ema.ckpt")
    plain = convert_checkpoint(tmp_path / "ema.ckpt", tmp_path / "raw")
    assert plain.ema == "present" and plain.ignored == {"model_ema": len(ema)}
    assert_matches(raw, AutoencoderKL.from_pretrained(tmp_path / "raw"), size=32)
    assert convert_checkpoint(tmp_path / "ema.ckpt", tmp_path / "ema", use_ema=True).ema == "converted"
    assert_matches(averaged, AutoencoderKL.from_pretrained(tmp_path / "ema"), size=32)


def test_a_missing_or_misshaped_autoencoder_key_is_an_error_naming_it(tmp_path):
    state = reference("kl-f16").state_dict()
    missing = dict(state)
    del missing["decoder.up.4.attn.1.q.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ConvertError, match=r"missing autoencoder key 'decoder\.up\.4\.attn\.1\.q\.weight'"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "a")
    misshaped = {**state, "decoder.up.2.block.1.conv1.weight": torch.zeros(64, 64, 1, 1)}
    torch.save(misshaped, tmp_path / "misshaped.pt")
    with pytest.raises(ConvertError, match=r"'decoder\.up\.2\.block\.1\.conv1\.weight' has shape \(64, 64, 1, 1\)"):
        convert_checkpoint(tmp_path / "misshaped.pt", tmp_path / "b")
    unknown = {**state, "decoder.up.2.block.1.temb_proj.weight": torch.zeros(64, 512)}
    torch.save(unknown, tmp_path / "unknown.pt")
    with pytest.raises(ConvertError, match=r"'decoder\.up\.2\.block\.1\.temb_proj\.weight' has no place"):
        convert_checkpoint(tmp_path / "unknown.pt", tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written


# -- reading pickles safely -------------------------------------------------------------------------------------


def test_the_crafted_payload_would_run_under_plain_pickle(tmp_path):
    """The check below can fail: unpickled normally, the payload does create its marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


@pytest.mark.numerics
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_with_a_code_running_reduce_runs_nothing(zip_format, tmp_path):
    marker = tmp_path / "pwned"
    model = reference("attn-inner")
    checkpoint = lightning_checkpoint(model, payload=RunsCode(marker))
    checkpoint["top_level_payload"] = RunsCode(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=zip_format)
    result = convert_checkpoint(tmp_path / "evil.ckpt", tmp_path / "vae")
    assert not marker.exists()
    assert {"posix.mkdir", "os.mkdir"} & set(result.skipped_objects)  # seen, replaced, never called
    assert_matches(model, AutoencoderKL.from_pretrained(tmp_path / "vae"), size=32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, used here only to make such an archive
def test_a_torchscript_archive_is_refused_not_loaded(tmp_path):
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 3, 1)), tmp_path / "scripted.pt")
    with pytest.raises(ConvertError, match="scripted.pt: a TorchScript archive"):
        convert_checkpoint(tmp_path / "scripted.pt", tmp_path / "vae")


def test_other_loaders_still_refuse_pickles(tmp_path):
    torch.save(reference("attn-inner").state_dict(), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_vae(tmp_path / "model.ckpt")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latent_vae", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_reports_truncated_and_foreign_files_in_one_line_without_a_traceback(tmp_path, capsys):
    torch.save(lightning_checkpoint(reference("attn-inner")), tmp_path / "model.ckpt")
    data = (tmp_path / "model.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("notes.ckpt", "broken.safetensors", "empty.pt", "absent.ckpt"):
        assert main(["convert", str(tmp_path / name), "--out", str(tmp_path / "bad")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], lines
    # One through a real process: exit status 2, one line on stderr, no traceback.
    failed = run_cli("convert", str(tmp_path / "truncated.ckpt"), "--out", str(tmp_path / "bad"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()] and "truncated.ckpt" in failed.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_converts_and_prints_the_architecture(tmp_path, capsys):
    torch.save(lightning_checkpoint(reference("kl-f16")), tmp_path / "kl-f16.ckpt")
    code = main(["convert", str(tmp_path / "kl-f16.ckpt"), "--out", str(tmp_path / "vae"),
                 "--single-file", str(tmp_path / "vae.safetensors")])
    out = capsys.readouterr().out
    assert code == 0
    assert "ch_mult (1, 1, 2, 2, 4)" in out and "attention at levels [4] of the encoder" in out
    assert "ignored 3 tensors that are not the autoencoder: loss 3" in out
    assert "latent-vae calibrate" in out
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["latent_channels"] == 16
    assert load_vae(tmp_path / "vae.safetensors").config.down_block_types[-1] == "AttnDownEncoderBlock2D"
