"""Property-based bad input (Hypothesis): the command line's promises hold for every generated case.

Over the commands' options, model config.json files, LDM ddconfig files, latent file metadata and precompute source
rows, every generated case must: exit 0, 1 or 2 (never 3, a bug); print no traceback; when it exits 2, print one
error line naming the bad input (the option, or the file); when it exits 1, name each failed input; and write
nothing outside `--out`. Commands run in this process on tiny models and 32-pixel images. The examples are few
and derandomized (no example database), so CI runs the same cases every time, in well under two minutes.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from cli_harness import changed_outside, check_promises, png_bytes, run_cli, snapshot, write_png, write_tar
from helpers import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from latent_vae import build_vae, save_vae

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=10)  # cases that run the whole command (a precompute, a conversion)
COUNTER = itertools.count()

# Text that has broken option parsers somewhere: empty, signs, exponents, NaN and inf, too many digits, unicode
# digits, units, control characters, things that look like options or JSON.
HOSTILE = ["", " ", "0", "-0", "-1", "0.5", "1e3", "1e400", "-1e400", "nan", "NaN", "inf", "-inf", "9" * 400,
           "0x10", "1_000", "٣", "١٠", "4GB", "0.5GB", "1KiB", "12XB", "2147483648", "18446744073709551616", "\n",
           "\x00", "\x1b[2J", "cuda", "cuda:7", "mps", "tpu", "auto", "cpu", "-", "--", "=", "'", "{}", "[]", "true",
           "None", "😀"]
hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=8),
    # out of every range: a valid size drawn here (a 20000-pixel --resolution) would be a long run, not a bad input
    st.integers(-(10**30), 0).map(str),
    st.integers(2**31, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


def option_values(valid: st.SearchStrategy) -> st.SearchStrategy[str]:
    """Mostly hostile text, sometimes a valid value (kept small: a valid resolution of 30000 is a long run, not a
    bad input)."""
    return st.one_of(hostile_text, valid.map(str))


# Each option with the valid values that cost little on a tiny model.
MODEL_OPTIONS = {
    "--batch-size": st.integers(1, 8),
    "--max-memory": st.sampled_from(["1MiB", "64MB", "2GB", "1.5GiB"]),
    "--tile-size": st.sampled_from([0, 16, 32, 48, 100000]),
    "--seed": st.integers(-(2**63), 2**64 - 1),
    "--device": st.sampled_from(["cpu", "auto"]),
    "--dtype": st.sampled_from(["fp32", "bf16"]),
}
COMMAND_OPTIONS = {
    "encode": {**MODEL_OPTIONS, "--max-pixels": st.integers(0, 5000)},
    "decode": MODEL_OPTIONS,
    "reconstruct": {"--max-pixels": st.integers(0, 5000), "--batch-size": st.integers(1, 4)},
    "interpolate": {"--steps": st.integers(2, 4), "--resolution": st.integers(1, 40),
                    "--mode": st.sampled_from(["slerp", "lerp"])},
    "sample-photos": {"--resolution": st.integers(1, 32)},
    "calibrate": {"--resolution": st.integers(1, 40), "--limit": st.integers(0, 3), "--max-pixels": st.integers(0, 5000)},
    "info": {"--resolution": st.integers(1, 1 << 15), "--seed": st.integers(-(2**63), 2**64 - 1)},
    "precompute": {"--resolution": st.sampled_from([16, 32, 48]), "--batch-size": st.integers(1, 4),
                   "--shard-size": st.integers(1, 4), "--max-upscale": st.floats(1, 8), "--max-aspect": st.floats(1, 8),
                   "--claim-timeout": st.floats(0.5, 1e6), "--max-pixels": st.integers(1, 5000),
                   "--max-memory": st.sampled_from(["1MiB", "2GB"]), "--tile-size": st.sampled_from([16, 32]),
                   "--bucket-step": st.sampled_from([16, 32, 24]), "--dtype": st.sampled_from(["bf16", "fp16", "fp32"]),
                   "--device": st.sampled_from(["cpu"]), "--key-column": st.sampled_from(["key", "file_name"]),
                   "--caption-column": st.sampled_from(["text", "caption"])},
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """Inputs for every command: images, a model folder, a latent file, an LDM checkpoint. Outputs go below it,
    each to a new --out, and nothing else in it may change."""
    root = tmp_path_factory.mktemp("fuzz")
    write_png(root / "photos" / "a.png", 0)
    write_png(root / "photos" / "b.png", 1, 40, 48)
    save_vae(build_vae(TINY, seed=0), root / "model")
    assert run_cli("encode", root / "photos" / "a.png", "--out", root / "latents", "--model", root / "model",
                   "--device", "cpu")[0] == 0
    from test_convert import LDMAutoencoder

    torch.manual_seed(0)
    ldm = LDMAutoencoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4)
    torch.save({"state_dict": ldm.state_dict()}, root / "ldm.ckpt")
    return root


def new_out(root: Path, suffix: str = "") -> Path:
    return root / "outs" / f"out{next(COUNTER)}{suffix}"


def run_checked(root: Path, out: Path, *argv, names: tuple[str, ...]) -> tuple[int, str]:
    """Run, check the promises, check that nothing outside `out` changed; an exit 2 names one of `names`."""
    before = snapshot(root)
    code, _, err = run_cli(*argv)
    lines = check_promises(code, err)
    # the folder of all outputs changes when an --out appears in it: anything else changed is outside --out
    outside = [p for p in changed_outside(before, snapshot(root), str(out.relative_to(root))) if p != "outs"]
    assert not outside, f"written outside --out: {outside}"
    if code == 2:
        [line] = [line for line in lines if ": error: " in line]
        assert any(name in line for name in names), (names, line)
    return code, err


def base_argv(command: str, root: Path, out: Path) -> list:
    model = ["--model", root / "model", "--device", "cpu"]
    return {
        "encode": ["encode", root / "photos" / "a.png", "--out", out, *model],
        "decode": ["decode", root / "latents" / "a.safetensors", "--out", out, *model],
        "reconstruct": ["reconstruct", root / "photos" / "a.png", "--out", out, *model],
        "interpolate": ["interpolate", root / "photos" / "a.png", root / "photos" / "b.png", "--out", out, *model],
        "sample-photos": ["sample-photos", "--out", out, "--model", TINY, "--device", "cpu", "--resolution", 16],
        "calibrate": ["calibrate", "--data", root / "photos", "--out", out, *model],
        "info": ["info", "--model", TINY],
        "precompute": ["precompute", "--model", root / "model", "--data", root / "photos", "--out", out,
                       "--num-workers", "0", "--no-progress", "--resolution", "32"],
    }[command]


@FUZZ
@given(st.data())
def test_any_option_value_keeps_the_promises(sandbox, data):
    command = data.draw(st.sampled_from(sorted(COMMAND_OPTIONS)), label="command")
    flag = data.draw(st.sampled_from(sorted(COMMAND_OPTIONS[command])), label="flag")
    value = data.draw(option_values(COMMAND_OPTIONS[command][flag]), label="value")
    out = new_out(sandbox, ".png" if command == "interpolate" else "")
    argv = base_argv(command, sandbox, out)
    # the option, its value (a model name), or the input it made fail (calibrate --max-pixels 1: no image in --data)
    names = (flag, flag[2:], flag[2:].replace("-", "_"), repr(value)[:30], *(str(a) for a in argv if isinstance(a, Path)))
    run_checked(sandbox, out, *argv, f"{flag}={value}", names=names)


# -- files: model configs, ddconfigs, latent metadata ---------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=6), st.sampled_from(HOSTILE))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
deep_json = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
garbage_text = st.one_of(st.text(max_size=40), deep_json, st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


def _json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(st.data())
def test_any_model_config_keeps_the_promises(sandbox, data):
    config = json.loads((sandbox / "model" / "config.json").read_text())
    if data.draw(st.booleans(), label="whole file"):
        text = data.draw(st.one_of(garbage_text, json_values.map(_json_text)), label="config.json")
    else:
        field = data.draw(st.sampled_from(sorted(config) + ["extra"]), label="field")
        config[field] = data.draw(json_values, label="value")
        text = _json_text(config)
    folder = sandbox / "models" / f"m{next(COUNTER)}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(text, encoding="utf-8")
    os.link(sandbox / "model" / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.safetensors")
    out = new_out(sandbox)
    try:
        run_checked(sandbox, out, "encode", sandbox / "photos" / "a.png", "--out", out, "--model", folder,
                    "--device", "cpu", names=(str(folder),))
    finally:
        shutil.rmtree(folder)


DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
dd_values = st.one_of(json_values, st.integers(-(2**70), 2**70), st.lists(st.integers(-3, 300), max_size=5))


@FEW
@given(st.data())
def test_any_ddconfig_keeps_the_promises(sandbox, data):
    dd = dict(DDCONFIG)
    if data.draw(st.booleans(), label="whole file"):
        text = data.draw(st.one_of(garbage_text, json_values.map(_json_text)), label="yaml")
    else:
        for field in data.draw(st.lists(st.sampled_from(sorted(DDCONFIG) + ["embed_dim"]), min_size=1, max_size=2)):
            dd[field] = data.draw(dd_values, label=field)
        text = _json_text({"model": {"params": {"embed_dim": 4, "ddconfig": dd}}})  # JSON is YAML
    config = sandbox / "configs" / f"dd{next(COUNTER)}.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(text, encoding="utf-8")
    out = new_out(sandbox)
    try:
        run_checked(sandbox, out, "convert", sandbox / "ldm.ckpt", "--out", out, "--config", config,
                    names=(str(config), str(sandbox / "ldm.ckpt")))
    finally:
        config.unlink()


@FUZZ
@given(st.data())
def test_any_latent_file_metadata_keeps_the_promises(sandbox, data):
    source = sandbox / "latents" / "a.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key in data.draw(st.lists(st.sampled_from(sorted(metadata) + ["extra"]), min_size=1, max_size=3), label="keys"):
        value = data.draw(st.one_of(st.none(), garbage_text, json_values.map(_json_text)), label=key)
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    latent = sandbox / "bad_latents" / f"l{next(COUNTER)}.safetensors"
    latent.parent.mkdir(exist_ok=True)
    save_file(tensors, str(latent), metadata=metadata)
    out = new_out(sandbox)
    try:
        code, err = run_checked(sandbox, out, "decode", latent, "--out", out, "--model", sandbox / "model",
                                "--device", "cpu", names=(str(latent),))
        if code == 1:
            assert f"failed: {latent}: " in err
    finally:
        latent.unlink()


# -- source rows: heterogeneous metadata, repeated keys --------------------------------------------------------------

member_json = st.one_of(json_values.map(_json_text), garbage_text, deep_json,
                        st.dictionaries(st.sampled_from(["caption", "text", "url"]), json_values, max_size=2)
                        .map(_json_text))


@st.composite
def tar_samples(draw):
    """1-4 samples; keys from a small alphabet (repeats, never two in a row, which a tar reader merges into one)."""
    keys = [draw(st.sampled_from("abc"))]
    for _ in range(draw(st.integers(0, 3))):
        keys.append(draw(st.sampled_from([k for k in "abc" if k != keys[-1]])))
    samples = []
    for i, key in enumerate(keys):
        members = []
        kind = draw(st.sampled_from(["png", "png", "garbage", "none"]))
        if kind == "png":
            members.append((f"{key}.png", png_bytes(i)))
        elif kind == "garbage":
            members.append((f"{key}.jpg", draw(st.binary(max_size=30))))
        if draw(st.booleans()):
            members.append((f"{key}.json", draw(member_json).encode("utf-8", "surrogatepass")))
        if draw(st.booleans()):
            members.append((f"{key}.txt", draw(st.text(max_size=10)).encode("utf-8", "surrogatepass")))
        if not members:
            members.append((f"{key}.cls", b"1"))
        samples.append(members)
    return samples


@FEW
@given(tar_samples())
def test_any_tar_metadata_keeps_the_shard_and_the_dataset_verifies(sandbox, samples):
    data = sandbox / "tars" / f"t{next(COUNTER)}"
    write_tar(data / "00000.tar", [m for sample in samples for m in sample])
    out = new_out(sandbox)
    try:
        code, err = run_checked(sandbox, out, "precompute", "--model", sandbox / "model", "--data", data, "--out", out,
                                "--num-workers", "0", "--no-progress", "--resolution", "32", names=(str(data),))
        assert code in (0, 1), err  # one odd sample never costs the shard
        rows = pq.read_table(out / "data" / "00000.parquet").to_pylist()
        failures = json.loads((out / "manifests" / "00000.json").read_text())["failures"]
        assert len(rows) + len(failures) == len(samples)  # every sample is a row or one named failure
        assert all(isinstance(r["text"], (str, type(None))) and isinstance(r["json"], (str, type(None))) for r in rows)
        assert run_cli("precompute", "--verify", out)[0] == 0  # every key once: what the run called complete
    finally:
        shutil.rmtree(data)


@FEW
@given(st.lists(json_values, min_size=2, max_size=2))
def test_any_metadata_jsonl_values_are_kept(sandbox, labels):
    data = sandbox / "folders" / f"f{next(COUNTER)}"
    shutil.copytree(sandbox / "photos", data)
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": name, "label": label}, allow_nan=True) + "\n"
        for name, label in zip(("a.png", "b.png"), labels)))
    out = new_out(sandbox)
    try:
        code, err = run_checked(sandbox, out, "precompute", "--model", sandbox / "model", "--data", data, "--out", out,
                                "--num-workers", "0", "--no-progress", "--resolution", "32",
                                names=(str(data), "metadata.jsonl"))
        if code != 2:  # 2: a metadata.jsonl datasets cannot hold (its message names the folder)
            assert code == 0, err
            assert len(pq.read_table(next((out / "data").glob("*.parquet")))) == 2
    finally:
        shutil.rmtree(data)


def test_the_fuzz_settings_are_reproducible_and_bounded():
    """CI runs the same few cases every time: derandomized, no example database, bounded examples."""
    for profile in (FUZZ, FEW):
        assert profile.derandomize and profile.database is None and profile.deadline is None
        assert profile.max_examples <= 40
