"""Bad input, round three: options checked before any work, outputs that never destroy, the file boundary as the
one place reader errors become the project's, heterogeneous metadata kept as data, claims that keep beating.

Each case asserts what a careful user expects: the exit status (2: nothing could run; 1: some inputs failed, every
good one written), one line naming the input or the option, no traceback, and nothing destroyed, half-written or
left behind.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_harness import (
    changed_outside,
    check_promises,
    png_bytes,
    random_bytes,
    run_cli,
    snapshot,
    write_png,
    write_tar,
)
from helpers import TINY

from latent_vae import build_vae, save_vae
from latent_vae.latents.claims import Heartbeat, HeartbeatStopped
from latent_vae.latents.options import PrecomputeOptions
from latent_vae.latents.precompute import precompute_latents
from latent_vae.utils.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_SOME_FAILED, one_line
from latent_vae.utils.option_values import BadValue, byte_size

MODEL = ["--model", TINY, "--device", "cpu"]
PRECOMPUTE = ["--resolution", "32", "--num-workers", "0", "--no-progress", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_vae(build_vae(TINY, seed=0), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with two images; every test checks that nothing in it changes but what the command writes."""
    write_png(tmp_path / "photos" / "a.png", 0)
    write_png(tmp_path / "photos" / "b.png", 1)
    return tmp_path


def one_error(err: str) -> str:
    [line] = [line for line in err.splitlines() if ": error: " in line]
    return line


# -- every option checked before any work or output ---------------------------------------------------------------


@pytest.mark.parametrize("flag, value, named", [
    ("--max-memory", "0.5", "at least 1MiB"),  # rounds to 0 bytes: every input failed with exit 1
    ("--max-memory", "9" * 400, "--max-memory"),  # an OverflowError, exit 3
    ("--max-memory", "nan", "--max-memory"),
    ("--max-memory", "inf", "--max-memory"),
    ("--batch-size", "0", "positive integer"),
    ("--batch-size", "1e3", "--batch-size"),
    ("--device", "gpu", "'gpu'"),
    ("--device", "cuda:99", "cuda:99"),
    ("--max-pixels", "-1", "--max-pixels"),
    ("--seed", "x", "--seed"),
])
def test_a_bad_model_option_is_one_line_naming_it_and_no_folder_is_created(work, flag, value, named):
    if value == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    before = snapshot(work)
    code, _, err = run_cli("encode", work / "photos" / "a.png", "--out", work / "out", *MODEL, flag, value)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT
    line = one_error(err)
    assert line.startswith(f"latent-vae encode: error: argument {flag}: ") and named in line
    assert not changed_outside(before, snapshot(work))  # and no --out folder either


@pytest.mark.parametrize("argv, flag", [
    (["--max-upscale", "nan"], "--max-upscale"),  # was written into latents.json, and the next run refused its folder
    (["--max-upscale", "0.5"], "--max-upscale"),
    (["--claim-timeout", "inf"], "--claim-timeout"),  # the heartbeat thread died of OverflowError in time.sleep
    (["--claim-timeout", "0"], "--claim-timeout"),
    (["--max-aspect", "inf"], "--max-aspect"),
    (["--shard-size", "0"], "--shard-size"),
    (["--max-memory", "0.5"], "--max-memory"),
    (["--device", "tpu"], "--device"),
])
def test_a_bad_precompute_option_is_one_line_and_no_dataset_is_started(work, argv, flag):
    before = snapshot(work)
    code, _, err = run_cli("precompute", "--model", TINY, "--data", work / "photos", "--out", work / "latents",
                           *PRECOMPUTE, *argv)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and one_error(err).startswith(f"latent-vae precompute: error: argument {flag}: ")
    assert not changed_outside(before, snapshot(work))


@pytest.mark.parametrize("argv", [["--max-pixels=--"], ["--out=--"], ["--model=--"]])
def test_a_flag_given_the_end_of_options_marker_is_one_line(work, argv):
    """argparse reads `--flag=--` as an empty list without calling the flag's parser (found by test_fuzz)."""
    code, _, err = run_cli("encode", work / "photos" / "a.png", "--out", work / "out", *MODEL, *argv)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and f"argument {argv[0].split('=')[0]}: expected one value" in one_error(err)


def test_the_python_api_checks_options_with_the_same_parsers():
    with pytest.raises(ValueError, match="max_upscale must be a finite number"):
        PrecomputeOptions(max_upscale=float("nan")).validate()
    with pytest.raises(ValueError, match="claim_timeout must be a positive finite number of seconds"):
        PrecomputeOptions(claim_timeout=float("inf")).validate()
    with pytest.raises(ValueError, match="max_memory must be at least 1MiB"):
        PrecomputeOptions(max_memory="0.5").validate()
    assert byte_size("1.5GiB") == int(1.5 * 2**30) and byte_size(" 512 MiB ") == 512 * 2**20
    with pytest.raises(BadValue):
        byte_size(True)  # a bool is no size


# -- outputs that never destroy -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["calibrate", "convert", "encode", "decode", "reconstruct", "sample-photos",
                                     "interpolate", "precompute"])
@pytest.mark.parametrize("existing", ["file", "folder of something else"])
def test_an_out_that_is_not_what_the_command_writes_is_refused_before_any_work(work, model_dir, command, existing):
    out = work / ("out.png" if command == "interpolate" and existing == "folder of something else" else "out")
    if existing == "file":
        out = work / "notes.txt"
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    image = work / "photos" / "a.png"
    argv = {
        "calibrate": ["calibrate", "--model", model_dir, "--data", work / "photos", "--resolution", 32, "--out", out],
        "convert": ["convert", work / "missing.ckpt", "--out", out],
        "encode": ["encode", image, "--out", out, *MODEL],
        "decode": ["decode", work / "missing.safetensors", "--out", out, *MODEL],
        "reconstruct": ["reconstruct", image, "--out", out, *MODEL],
        "sample-photos": ["sample-photos", "--out", out, "--resolution", 32, *MODEL],
        "interpolate": ["interpolate", image, image, "--resolution", 32, "--out", out, *MODEL],
        "precompute": ["precompute", "--model", TINY, "--data", work / "photos", "--out", out, *PRECOMPUTE],
    }[command]
    before = snapshot(work)
    code, _, err = run_cli(*argv)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT, err
    assert f"--out {out}: " in one_error(err)
    assert not changed_outside(before, snapshot(work))  # the file or folder is as it was


def test_a_file_is_never_replaced_by_a_folder_even_through_the_python_api(tmp_path):
    from latent_vae.utils.atomic import atomic_directory

    (tmp_path / "model").write_text("precious")
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert (tmp_path / "model").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_an_output_below_a_file_is_refused_before_any_work(work):
    (work / "notes.txt").write_text("precious")
    code, _, err = run_cli("encode", work / "photos" / "a.png", "--out", work / "notes.txt" / "sub", *MODEL)
    assert code == EXIT_BAD_INPUT and "is a file, not a folder" in one_error(err)


def test_an_output_folder_of_the_same_kind_is_used(work):
    """A rerun into its own output folder works: only what the command writes is there."""
    for _ in range(2):
        code, _, err = run_cli("encode", work / "photos" / "a.png", "--out", work / "out", *MODEL)
        assert code == EXIT_OK, err
    assert [p.name for p in (work / "out").iterdir()] == ["a.safetensors"]


def _ldm_checkpoint(path: Path) -> Path:
    from test_convert import reference

    torch.save({"state_dict": reference("kl-f8").state_dict()}, path)
    return path


def test_convert_never_exits_0_having_written_nothing(work):
    checkpoint = _ldm_checkpoint(work / "kl.ckpt")
    code, _, err = run_cli("convert", checkpoint, "--out", work / "converted")
    assert code == EXIT_OK, err
    assert {p.name for p in (work / "converted").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    # a second conversion into the model folder it wrote replaces it whole, atomically
    code, _, err = run_cli("convert", checkpoint, "--out", work / "converted")
    assert code == EXIT_OK and sorted(p.name for p in work.iterdir()) == ["converted", "kl.ckpt", "photos"]


# -- the file boundary: reader errors become one line naming the file --------------------------------------------


def test_a_deeply_nested_model_config_is_one_line_naming_the_file(work, model_dir):
    import shutil

    shutil.copytree(model_dir, work / "deep")
    (work / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    code, _, err = run_cli("encode", work / "photos" / "a.png", "--out", work / "out", "--model", work / "deep",
                           "--device", "cpu")
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and f"{work / 'deep' / 'config.json'}: " in one_error(err)
    assert "nested too deeply" in one_error(err)


def test_random_bytes_ending_in_a_zip_record_are_not_a_checkpoint(work):
    end_record = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 10, 0)  # zipfile.is_zipfile says yes
    (work / "junk.ckpt").write_bytes(random_bytes(500) + end_record)
    code, _, err = run_cli("convert", work / "junk.ckpt", "--out", work / "out")
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and f"{work / 'junk.ckpt'}: not a readable zip archive" in one_error(err)
    assert not (work / "out").exists()


@pytest.mark.parametrize("field, value, said", [
    ("ch", -4, "ddconfig ch must be an integer from 1"),  # torch's "negative dimension", exit 3
    ("ch", "wide", "ddconfig ch must be"),
    ("ch_mult", [1, -2], "ddconfig ch_mult must be"),
    ("ch_mult", 4, "ddconfig ch_mult must be a list"),
    ("num_res_blocks", 2.5, "ddconfig num_res_blocks"),
    ("ch", 48, "multiples of 32"),
])
def test_a_ddconfig_with_impossible_numbers_is_one_line_naming_the_file_and_field(work, field, value, said):
    checkpoint = _ldm_checkpoint(work / "kl.ckpt")
    ddconfig = {"ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "resolution": 256,
                "z_channels": 4, field: value}
    (work / "dd.yaml").write_text(json.dumps({"model": {"params": {"embed_dim": 4, "ddconfig": ddconfig}}}))
    code, _, err = run_cli("convert", checkpoint, "--out", work / "out", "--config", work / "dd.yaml")
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and one_error(err).startswith(f"latent-vae: error: {work / 'dd.yaml'}: ")
    assert said in one_error(err)


@pytest.mark.parametrize("content, said", [
    ("{garbage", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('{"format": "latent-vae/latents", "version": 2}', "not a complete record"),
    ('{"format": "latent-vae/latents", "version": 2, "resolution": "big"}', "resolution is 'big', not a int"),
])
def test_a_garbage_latents_json_is_one_line_naming_it(tmp_path, content, said):
    (tmp_path / "latents.json").write_text(content)
    code, _, err = run_cli("precompute", "--verify", tmp_path)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT and f"{tmp_path / 'latents.json'}: " in one_error(err) and said in one_error(err)


def test_a_damaged_manifest_is_a_problem_that_verify_names(work, model_dir):
    assert run_cli("precompute", "--model", model_dir, "--data", work / "photos", "--out", work / "out",
                   *PRECOMPUTE)[0] == EXIT_OK
    [manifest] = (work / "out" / "manifests").glob("*.json")
    manifest.write_text('{"input_shard": ')
    code, _, err = run_cli("precompute", "--verify", work / "out")
    assert code == EXIT_SOME_FAILED and "Traceback" not in err
    assert f"{work / 'out'}: {manifest}: not valid JSON" in err.splitlines()[0]


def test_a_parquet_file_of_random_bytes_is_one_line_naming_it(work):
    (work / "shards").mkdir()
    (work / "shards" / "00000.parquet").write_bytes(random_bytes(3000))
    code, _, err = run_cli("precompute", "--model", TINY, "--data", work / "shards", "--out", work / "out", *PRECOMPUTE)
    check_promises(code, err)
    assert code == EXIT_BAD_INPUT
    assert f"{work / 'shards' / '00000.parquet'}: not a readable parquet file" in one_error(err)


def test_a_control_character_in_a_name_keeps_the_failure_on_one_line(work):
    bad = work / "photos" / "bad\nname\x1b[2J.png"
    bad.write_text("not an image")
    code, _, err = run_cli("encode", work / "photos" / "a.png", bad, "--out", work / "out", *MODEL)
    assert code == EXIT_SOME_FAILED, err
    failures = [line for line in err.splitlines() if "failed: " in line]  # after whatever a progress bar drew
    assert len(failures) == 1, repr(err)
    assert "bad\\nname\\x1b[2J.png" in failures[0] and "\x1b[2J" not in err, repr(err)
    assert one_line(ValueError("a\nb\tc")) == "a\\nb\\tc"


# -- training configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, said, names_file", [
    ("[1, 2]", "must hold a JSON object, got a list", True),  # was AttributeError, exit 3
    ("{not json", "not valid JSON", True),  # was the parser's message without the file's name
    ('{"bogus": 1}', "unknown config option", True),
    ('{"learning_rate": "nan"}', "learning_rate must be a positive finite number", False),  # the field is named
    ('{"batch_size": 0}', "batch_size must be a positive integer", False),
    ('{"adam_beta1": 2}', "adam_beta1 must be a finite number from 0 to 1", False),
])
def test_a_malformed_training_config_is_one_line_naming_the_file(tmp_path, capsys, content, said, names_file):
    from training.train_vae import run

    config = tmp_path / "run.json"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        run(["--config", str(config), "--data", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_BAD_INPUT and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert said in line and (str(config) in line or not names_file)
    assert not (tmp_path / "out").exists()


# -- heterogeneous data is data -------------------------------------------------------------------------------------


def test_a_tar_caption_that_is_a_number_or_a_dict_is_kept_as_text(work, model_dir):
    write_tar(work / "tars" / "00000.tar", [
        ("a.png", png_bytes(0)), ("a.json", b'{"caption": 5}'),
        ("b.png", png_bytes(1)), ("b.json", b'{"caption": {"en": "a cat", "n": [1, 2]}}'),
        ("c.png", png_bytes(2)), ("c.txt", b"plain text"),
        ("d.png", png_bytes(3)), ("d.json", b"[" * 5000 + b"]" * 5000),  # deep: kept as the member's text
    ])
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", work / "tars", "--out", work / "out",
                           *PRECOMPUTE)
    check_promises(code, err)
    assert code == EXIT_OK, err
    rows = {r["key"]: r for r in pq.read_table(work / "out" / "data" / "00000.parquet").to_pylist()}
    assert rows["a"]["text"] == "5" and json.loads(rows["b"]["text"]) == {"en": "a cat", "n": [1, 2]}
    assert rows["c"]["text"] == "plain text" and rows["d"]["text"] is None and rows["d"]["json"].startswith("[[[")
    assert run_cli("precompute", "--verify", work / "out")[0] == EXIT_OK


def test_mixed_types_in_metadata_jsonl_become_json_text(work, model_dir):
    (work / "photos" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "label": 3}) + "\n" + json.dumps({"file_name": "b.png", "label": "cat"}) + "\n")
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", work / "photos", "--out", work / "out",
                           *PRECOMPUTE)
    check_promises(code, err)
    assert code == EXIT_OK, err
    rows = {r["key"]: r for r in pq.read_table(next((work / "out" / "data").glob("*.parquet"))).to_pylist()}
    assert (rows["a.png"]["label"], rows["b.png"]["label"]) == ("3", '"cat"')


def test_a_parquet_shard_whose_column_type_differs_fails_its_rows_alone(work, model_dir):
    (work / "shards").mkdir()
    pq.write_table(pa.table({"jpg": [png_bytes(0), png_bytes(1)], "label": [1, 2]}), work / "shards" / "00000.parquet")
    pq.write_table(pa.table({"jpg": [png_bytes(2), png_bytes(3)], "label": ["x", "y"]}), work / "shards" / "00001.parquet")
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", work / "shards", "--out", work / "out",
                           *PRECOMPUTE)
    check_promises(code, err)
    assert code == EXIT_SOME_FAILED
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all("column 'label'" in line and "[bad_metadata]" in line for line in failed)
    assert pq.read_table(work / "out" / "data" / "00000.parquet").column("label").to_pylist() == [1, 2]
    assert run_cli("precompute", "--verify", work / "out")[0] == EXIT_OK


def test_repeated_keys_within_a_shard_are_made_unique_and_the_dataset_verifies(work, model_dir):
    (work / "shards").mkdir()
    pq.write_table(pa.table({"key": ["x", "x", "y", "x"], "jpg": [png_bytes(i) for i in range(4)]}),
                   work / "shards" / "00000.parquet")
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", work / "shards", "--out", work / "out",
                             *PRECOMPUTE)
    assert code == EXIT_OK, err
    keys = pq.read_table(work / "out" / "data" / "00000.parquet").column("key").to_pylist()
    assert keys == ["x", "x#2", "y", "x#3"]
    assert run_cli("precompute", "--verify", work / "out")[0] == EXIT_OK


def test_a_key_repeated_across_shards_is_never_called_complete(work, model_dir):
    (work / "shards").mkdir()
    for shard, keys in enumerate((["x", "y"], ["y", "z"])):
        pq.write_table(pa.table({"key": keys, "jpg": [png_bytes(shard * 2 + i) for i in range(2)]}),
                       work / "shards" / f"0000{shard}.parquet")
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", work / "shards", "--out", work / "out",
                             *PRECOMPUTE)
    check_promises(code, err)
    assert code == EXIT_SOME_FAILED and "1 key(s) occur more than once: y" in err and "not complete" in err
    assert json.loads((work / "out" / "summary.json").read_text())["complete"] is False
    assert run_cli("precompute", "--verify", work / "out")[0] == EXIT_SOME_FAILED  # the two agree


def test_repeated_keys_of_a_dataset_are_refused_up_front_naming_one(work, model_dir):
    import datasets

    dataset = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(i), "path": None} for i in range(3)],
                                          "id": ["p", "q", "p"]}).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"repeated values \(e\.g\. 'p'\)"):
        precompute_latents(model_dir, dataset, work / "out", key_column="id", num_workers=0, resolution=32,
                           progress=False)


# -- claims that keep beating -------------------------------------------------------------------------------------


def test_a_heartbeat_that_stops_says_so_and_stops_claiming(tmp_path, monkeypatch, capsys):
    import latent_vae.latents.claims as claims_module

    with pytest.raises(ValueError, match="positive finite number of seconds"):
        Heartbeat(float("inf"))

    def broken_utime(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(claims_module.os, "utime", broken_utime)
    beat = Heartbeat(0.01)
    (tmp_path / "a.claim").write_text("{}")
    beat.add(tmp_path / "a.claim")
    deadline = time.monotonic() + 10
    while beat.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(HeartbeatStopped, match="stopped .*PermissionError.*claims no more shards"):
        beat.check()
    assert "stops claiming shards" in capsys.readouterr().err
    monkeypatch.setitem(Heartbeat._per_process, os.getpid(), beat)
    assert Heartbeat.of_this_process(0.01) is not beat  # a later run in this process gets a live heartbeat
