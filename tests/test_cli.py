"""The ``tropnnc`` command line through ``main(argv)``, plus one real subprocess run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Subset, TensorDataset

from tropnnc import io, zoo
from tropnnc.cli import main, parse_keep, parse_option
from tropnnc.experiments.datasets import get_dataset
from tropnnc.experiments.train import evaluate

FACTORY_MODULE = "tropnnc_test_cli_nets"
NETS = textwrap.dedent("""
    from torch import nn


    def tanh_mlp():
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                              nn.Linear(8, 2))
        model.input_shape = (6,)
        return model


    def plain_cnn():  # says nothing about its input shape
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
""")


def fashion_mnist_available() -> bool:
    try:
        get_dataset("fashion-mnist", "test")
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def nets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_nets")
    (folder / f"{FACTORY_MODULE}.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(FACTORY_MODULE, None)


@pytest.fixture
def lenet_files(tmp_path) -> dict[str, Path]:
    """LeNet-300-100 with random weights as safetensors, .pt state_dict and pickled module."""
    torch.manual_seed(0)
    model = zoo.build("lenet-300-100")
    files = {
        "st": tmp_path / "w.safetensors",
        "pt": tmp_path / "w.pt",
        "whole": tmp_path / "whole.pt",
    }
    save_file(model.state_dict(), str(files["st"]))
    torch.save(model.state_dict(), files["pt"])
    torch.save(model, files["whole"])
    return files


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------------------------------------
# argument parsing helpers
# ------------------------------------------------------------------------------------------


def test_parse_keep_and_options():
    assert parse_keep("0.5") == 0.5 and parse_keep("64") == 64
    assert parse_keep("features.0=0.3, classifier.1=40") == {"features.0": 0.3, "classifier.1": 40}
    assert parse_option("refine=5") == ("refine", 5)
    assert parse_option("split-signs=false") == ("split_signs", False)
    assert parse_option("threshold=None") == ("threshold", None)
    assert parse_option("norm=l1") == ("norm", "l1")
    assert parse_option("x=1e-3") == ("x", 1e-3)


# ------------------------------------------------------------------------------------------
# compress
# ------------------------------------------------------------------------------------------


def test_compress_writes_model_directory_and_input_is_untouched(tmp_path, capsys, lenet_files):
    inputs = tree(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "compress",
        "--model",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "--out",
        out,
        "--keep",
        "0.3",
        "--seed",
        "2",
        "--option",
        "refine=1",
        "--radius",
        "2",
    )
    assert code == 0, err
    assert "300 -> 90" in stdout and f"wrote {out}" in stdout
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == inputs
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["compression"]
    assert (plan["method"], plan["seed"], plan["keep"], plan["radius"]) == ("adaptive", 2, 0.3, 2)
    assert plan["options"]["refine"] == 1 and plan["widths"] == {"1": 90, "3": 30}
    assert plan["reconstruction"]["bn_shrink"] == 0.8  # the default pipeline's
    assert all(b["reconstructed"] for b in plan["blocks"])
    assert plan["source"]["weights"] == str(lenet_files["st"])
    model = io.load(out)
    assert model[1].out_features == 90 and model[3].out_features == 30


def test_compress_json_keep_forms_and_global_flags_after_command(tmp_path, capsys, lenet_files):
    code, stdout, _ = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["pt"],
        "-o",
        tmp_path / "a",
        "--keep",
        "1=40",
        "--method",
        "l1",
        "--json",
    )
    assert code == 0
    data = json.loads(stdout)
    assert [(b["layer"], b["units_after"]) for b in data["blocks"]] == [("1", 40)]
    assert "assignment" not in data["blocks"][0] and data["out"] == str(tmp_path / "a")
    code, stdout, _ = run(
        capsys,
        "--quiet",
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["pt"],
        "-o",
        tmp_path / "b",
        "--keep",
        "7",
    )
    assert code == 0 and stdout == ""
    assert io.load(tmp_path / "b")[3].out_features == 7


def test_compress_config_files_json_and_toml(tmp_path, capsys, lenet_files):
    (tmp_path / "c.toml").write_text(
        textwrap.dedent(f"""
        [compress]
        model = "lenet-300-100"
        weights = "{lenet_files["st"]}"
        keep = 0.2
        method = "neural-path-kmeans"
        seed = 5
        [compress.options]
        restarts = 1
    """)
    )
    code, _, err = run(
        capsys,
        "compress",
        "--config",
        tmp_path / "c.toml",
        "--out",
        tmp_path / "t",
        "--keep",
        "0.5",
    )  # the flag wins over the file
    assert code == 0, err
    plan = json.loads((tmp_path / "t" / "manifest.json").read_text())["compression"]
    assert (plan["method"], plan["seed"], plan["keep"]) == ("neural-path-kmeans", 5, 0.5)
    assert plan["options"]["restarts"] == 1
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "model": "lenet-300-100",
                "weights": str(lenet_files["st"]),
                "keep": {"3": 10},
                "out": str(tmp_path / "j"),
                "strict": True,
            }
        )
    )
    code, _, err = run(capsys, "compress", "--config", tmp_path / "c.json")
    assert code == 0, err
    assert io.load(tmp_path / "j")[3].out_features == 10
    (tmp_path / "bad.json").write_text(json.dumps({"keeep": 0.5}))
    code, _, err = run(capsys, "compress", "--config", tmp_path / "bad.json")
    assert code == 2 and "unknown setting(s) keeep" in err


def test_compress_with_budget_and_calibration(tmp_path, capsys, lenet_files):
    code, stdout, err = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "-o",
        tmp_path / "b",
        "--budget",
        "0.5",
        "--budget-unit",
        "params",
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    assert data["params_after"] <= 0.5 * data["params_before"] + 1000
    assert (
        json.loads((tmp_path / "b" / "manifest.json").read_text())["compression"]["budget"] == 0.5
    )
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed: calibration run skipped")
    code, stdout, err = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "-o",
        tmp_path / "c",
        "--keep",
        "0.5",
        "--method",
        "l1",
        "--calibration",
        "64",
        "--dataset",
        "fashion-mnist",
        "--json",
    )
    assert code == 0, err
    assert all(b["data_driven"] for b in json.loads(stdout)["blocks"])
    plan = json.loads((tmp_path / "c" / "manifest.json").read_text())["compression"]
    assert plan["calibration"] == {"dataset": "fashion-mnist", "split": "train", "inputs": 64}


def test_compress_budget_round_to_and_repair_flags(tmp_path, capsys, lenet_files):
    code, stdout, err = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "-o",
        tmp_path / "r",
        "--budget",
        "0.4",
        "--round-to",
        "8",
        "--min-width",
        "16",
        "--repair",
        "bn",
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    widths = [(b["units_after"], b["units_before"]) for b in data["blocks"]]
    # multiples of 8 of at least 16, or the full width (allowed whatever round_to says)
    assert all((w % 8 == 0 and w >= 16) or w == n for w, n in widths), widths
    assert data["params_after"] <= 0.4 * data["params_before"]
    # lenet has no BatchNorm: the repair is a recorded no-op
    assert all(not b["repaired"] and "BatchNorm" in b["repair_note"] for b in data["blocks"])
    plan = json.loads((tmp_path / "r" / "manifest.json").read_text())["compression"]
    assert (plan["round_to"], plan["min_width"], plan["repair"]) == (8, 16, "bn")
    code, _, err = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "-o",
        tmp_path / "x",
        "--repair",
        "magic",
    )
    assert code == 2 and "invalid choice: 'magic'" in err


def test_compress_overwrite_and_strict(tmp_path, capsys, lenet_files, nets):
    out = tmp_path / "out"
    args = ["compress", "lenet-300-100", "--weights", lenet_files["st"], "-o", out]
    assert run(capsys, *args, "--keep", "0.5")[0] == 0
    assert run(capsys, *args, "--keep", "0.2", "--overwrite")[0] == 0
    assert io.load(out)[1].out_features == 60
    torch.manual_seed(0)
    tanh = io.load_model(f"{FACTORY_MODULE}:tanh_mlp", random_init=True)
    save_file(tanh.state_dict(), str(tmp_path / "g.safetensors"))
    spec = [f"{FACTORY_MODULE}:tanh_mlp", "--weights", tmp_path / "g.safetensors"]
    code, _, err = run(capsys, "compress", *spec, "-o", tmp_path / "g", "--strict")
    assert code == 1 and "strict=True" in err and "Tanh" in err
    code, _, err = run(capsys, "compress", *spec, "-o", tmp_path / "g")
    assert code == 0, err
    code, _, err = run(capsys, "info", tmp_path / "g")
    assert code == 1 and "--trust-code" in err
    code, stdout, _ = run(capsys, "info", tmp_path / "g", "--trust-code")
    assert code == 0 and "1 (Tanh) after 0 is not a supported activation" in stdout


def test_compress_bfloat16_weights_keeps_the_dtype_and_info_shows_the_plan(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.build("lenet-300-100").to(torch.bfloat16)
    save_file(model.state_dict(), str(tmp_path / "bf16.safetensors"))
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        tmp_path / "bf16.safetensors",
        "-o",
        out,
        "--keep",
        "0.5",
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"]["dtypes"] == ["torch.bfloat16"]
    assert {p.dtype for p in io.load(out).parameters()} == {torch.bfloat16}
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "torch.bfloat16" in stdout
    assert "compressed with adaptive (seed 0), widths {'1': 150, '3': 50}" in stdout


# ------------------------------------------------------------------------------------------
# bad inputs: (argv, exit status, message); nothing may be left behind
# ------------------------------------------------------------------------------------------


def _bad_files(tmp: Path, lenet_files: dict[str, Path]) -> None:
    data = lenet_files["st"].read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.manual_seed(0)
    model = zoo.build("lenet-300-100")
    with torch.no_grad():
        model[1].weight[3, 3] = math.nan
    save_file(model.state_dict(), str(tmp / "nan.safetensors"))
    torch.manual_seed(0)
    save_file(zoo.build("mlp", sizes=[4, 2]).state_dict(), str(tmp / "tiny.safetensors"))
    (tmp / "file").write_text("a regular file")
    io.save(zoo.build("lenet-300-100"), tmp / "v99")
    manifest = json.loads((tmp / "v99" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp / "v99" / "manifest.json").write_text(json.dumps(manifest))
    # a model directory A holding another model directory, a weights file and a config
    io.save(zoo.build("lenet-300-100"), tmp / "A")
    io.save(zoo.build("lenet-300-100"), tmp / "A" / "inner")
    shutil.copy(lenet_files["st"], tmp / "A" / "w.safetensors")
    (tmp / "A" / "c.json").write_text("{}")
    good = json.loads((tmp / "A" / "manifest.json").read_text())
    variants = {
        "escape": lambda m: m["weights"].update(file="../w.safetensors"),
        "nosha": lambda m: m["weights"].pop("sha256"),
        "nofile": lambda m: m["weights"].pop("file"),
        "layerlist": lambda m: m.update(layers=[1]),
        "width": lambda m: m["layers"]["1"].update(out_features=-5),
    }
    for name, change in variants.items():
        shutil.copytree(tmp / "A", tmp / name, ignore=shutil.ignore_patterns("inner", "c.json"))
        data = json.loads(json.dumps(good))
        change(data)
        (tmp / name / "manifest.json").write_text(json.dumps(data))
    (tmp / "deep").mkdir()
    (tmp / "deep" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "deep.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    state = zoo.build("lenet-300-100").state_dict()
    for dtype in ("int32", "uint8", "bool", "complex64"):
        save_file(
            {k: v.to(getattr(torch, dtype)) for k, v in state.items()},
            str(tmp / f"{dtype}.safetensors"),
        )
    save_file({**state, "3.weight": state["3.weight"].double()}, str(tmp / "mixed.safetensors"))
    out = str(tmp / "o")
    (tmp / "trust.json").write_text(json.dumps({"trust_pickle": True, "out": out}))
    (tmp / "factory.json").write_text(json.dumps({"model": "os:getcwd", "out": out}))
    (tmp / "keepopt.json").write_text(json.dumps({"options": {"keep": 0.1}, "out": out}))


LENET = ["lenet-300-100", "--weights", "{st}"]
BAD_INPUTS = [
    # (name, argv, exit status, message)
    (
        "truncated safetensors",
        ["compress", "lenet-300-100", "--weights", "{tmp}/cut.safetensors"],
        1,
        "cut.safetensors: corrupt or truncated safetensors file (Error while deserializing header",
    ),
    (
        "manifest version",
        ["compress", "{tmp}/v99"],
        1,
        "unknown manifest format version 99 (this is tropnnc",
    ),
    (
        "weights of another network",
        ["compress", "e2-cnn", "--weights", "{st}"],
        1,
        "w.safetensors does not match e2-cnn: missing keys features.0.weight",
    ),
    (
        "missing weights file",
        ["compress", "lenet-300-100", "--weights", "{tmp}/nope.pt"],
        1,
        "weights file {tmp}/nope.pt does not exist",
    ),
    ("missing model", ["compress", "{tmp}/nope"], 1, "model '{tmp}/nope' not found"),
    (
        "missing config",
        ["compress", *LENET, "--config", "{tmp}/nope.toml"],
        2,
        "config file {tmp}/nope.toml does not exist",
    ),
    (
        "output under a regular file",
        ["compress", *LENET, "-o", "{tmp}/file/out"],
        1,
        "cannot write {tmp}/file/out: {tmp}/file is not a directory",
    ),
    (
        "output exists",
        ["compress", *LENET, "-o", "{tmp}/file"],
        1,
        "output {tmp}/file already exists (pass --overwrite to replace it)",
    ),
    (
        "output is the input",
        ["compress", "{tmp}/v99", "-o", "{tmp}/v99", "--overwrite"],
        1,
        "output {tmp}/v99 is the input model",
    ),
    (
        "keep fraction > 1",
        ["compress", *LENET, "--keep", "1.5"],
        1,
        "keep fraction 1.5 for 1 must be in (0, 1]",
    ),
    (
        "keep width too large",
        ["compress", *LENET, "--keep", "301"],
        1,
        "keep width 301 for 1 must be between 1 and the layer's 300 units",
    ),
    ("keep zero", ["compress", *LENET, "--keep", "0"], 1, "keep width 0 for 1 must be between"),
    (
        "keep unknown layer",
        ["compress", *LENET, "--keep", "fc9=0.5"],
        1,
        "keep names layers that are not compressible blocks: fc9",
    ),
    (
        "keep not a number",
        ["compress", *LENET, "--keep", "half"],
        2,
        "--keep expects a fraction like 0.5",
    ),
    (
        "budget negative",
        ["compress", *LENET, "--budget", "-0.5"],
        2,
        "argument --budget: expected a positive number, got '-0.5'",
    ),
    ("budget > 1", ["compress", *LENET, "--budget", "1.5"], 1, "budget 1.5 must be in (0, 1]"),
    (
        "keep and budget",
        ["compress", *LENET, "--budget", "0.5", "--keep", "0.5"],
        1,
        "pass either keep or budget, not both",
    ),
    (
        "unknown method",
        ["compress", *LENET, "--method", "magic"],
        1,
        "unknown method 'magic'; valid methods: adaptive, cup, l1",
    ),
    (
        "unknown method option",
        ["compress", *LENET, "--option", "speed=11"],
        1,
        "method 'adaptive' got unknown option(s) speed",
    ),
    (
        "bad option syntax",
        ["compress", *LENET, "--option", "refine"],
        2,
        "--option expects key=value",
    ),
    (
        "pickled module without the flag",
        ["compress", "{whole}"],
        1,
        "whole.pt is a pickle of Python objects (tropnnc.zoo.MLP), not just tensors; it was not "
        "loaded because unpickling can run arbitrary code: pass --trust-pickle",
    ),
    (
        "NaN weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/nan.safetensors"],
        1,
        "compress: 1.weight of MLP contains NaN or inf values",
    ),
    (
        "no compressible block",
        [
            "compress",
            "mlp",
            "--zoo-config",
            '{{"sizes": [4, 2]}}',
            "--weights",
            "{tmp}/tiny.safetensors",
        ],
        1,
        "compress: MLP has no compressible block (producer -> ReLU -> consumer); skipped: 1 "
        "output layer; first: 1: 1 is an output layer (never compressed); verbose logging (-v) "
        "lists every layer",
    ),
    (
        "bad zoo config JSON",
        ["compress", "mlp", "--zoo-config", "{{sizes"],
        2,
        "argument --zoo-config: not a JSON object",
    ),
    (
        "calibration without dataset",
        ["compress", *LENET, "--calibration", "10"],
        2,
        "--calibration N needs --dataset",
    ),
    ("model given twice", ["compress", *LENET, "--model", "lenet5"], 2, "give the model once"),
    (
        "data-driven method without data",
        ["compress", *LENET, "--method", "thinet"],
        2,
        "method 'thinet' is data-driven: pass --calibration N --dataset D",
    ),
    (
        "single-output method",
        ["compress", *LENET, "--method", "zonotope-kmeans"],
        1,
        "zonotope-kmeans handles single-output blocks only",
    ),
    (
        "unknown dataset",
        ["compress", *LENET, "--calibration", "5", "--dataset", "imagenet3"],
        1,
        "unknown dataset 'imagenet3'",
    ),
    # files: an output may not be, contain or lie inside an input
    (
        "export over its own weights",
        ["export", *LENET, "-o", "{st}", "--format", "pt2", "--overwrite"],
        1,
        "output {st} is the input weights {st}: writing it would destroy or change that input",
    ),
    (
        "export into the model directory",
        ["export", "{tmp}/A", "-o", "{tmp}/A/model.safetensors", "--format", "pt2", "--overwrite"],
        1,
        "output {tmp}/A/model.safetensors lies inside the input model {tmp}/A",
    ),
    (
        "output contains the input model",
        ["compress", "{tmp}/A/inner", "-o", "{tmp}/A", "--overwrite"],
        1,
        "output {tmp}/A contains the input model {tmp}/A/inner",
    ),
    (
        "output contains the weights",
        [
            "compress",
            "lenet-300-100",
            "--weights",
            "{tmp}/A/w.safetensors",
            "-o",
            "{tmp}/A",
            "--overwrite",
        ],
        1,
        "output {tmp}/A contains the input weights {tmp}/A/w.safetensors",
    ),
    (
        "output contains the config",
        ["compress", *LENET, "--config", "{tmp}/A/c.json", "-o", "{tmp}/A", "--overwrite"],
        1,
        "output {tmp}/A contains the input config file {tmp}/A/c.json",
    ),
    (
        "output inside the input model",
        ["compress", "{tmp}/A", "-o", "{tmp}/A/small"],
        1,
        "output {tmp}/A/small lies inside the input model {tmp}/A",
    ),
    (
        "manifest weights outside its directory",
        ["compress", "{tmp}/escape"],
        1,
        "weights.file '../w.safetensors' points outside the model directory",
    ),
    (
        "manifest without sha256",
        ["compress", "{tmp}/nosha"],
        1,
        "corrupt manifest ('weights' has no 'sha256' string",
    ),
    (
        "manifest without weights.file",
        ["compress", "{tmp}/nofile"],
        1,
        "corrupt manifest ('weights' has no 'file' string",
    ),
    (
        "manifest layers not an object",
        ["compress", "{tmp}/layerlist"],
        1,
        "corrupt manifest ('layers' must be a JSON object, found list)",
    ),
    (
        "manifest width of -5",
        ["compress", "{tmp}/width"],
        1,
        "manifest.json: bad record for layer '1' (sizes must be positive integers, got "
        "{{'out_features': -5}})",
    ),
    (
        "manifest nested 100k deep",
        ["compress", "{tmp}/deep"],
        1,
        "corrupt manifest (JSON nested too deeply)",
    ),
    (
        "config sets trust_pickle",
        ["compress", "{whole}", "--config", "{tmp}/trust.json"],
        2,
        "trust_pickle can only be given on the command line (--trust-pickle)",
    ),
    (
        "config names a factory",
        ["compress", "--config", "{tmp}/factory.json"],
        2,
        "model 'os:getcwd' is a package.module:factory path, which imports and runs code",
    ),
    # clear errors instead of internals
    (
        "radius too large",
        ["compress", *LENET, "--radius", "1e308"],
        1,
        "compress: radius 1e+308 is too large (its square overflows float64)",
    ),
    (
        "seed too large",
        ["compress", *LENET, "--seed", "9223372036854775808"],
        2,
        "argument --seed: expected a seed from 0 to 4294967295",
    ),
    (
        "option number too large",
        ["compress", *LENET, "--option", "restarts=99999999999999999999"],
        2,
        "--option restarts=99999999999999999999: the number is too large",
    ),
    (
        "device meta",
        ["compress", *LENET, "--device", "meta"],
        2,
        "argument --device: 'meta' tensors hold no values",
    ),
    (
        "int32 weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/int32.safetensors"],
        1,
        "int32.safetensors: 1.weight is torch.int32, 1.bias is torch.int32",
    ),
    (
        "uint8 weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/uint8.safetensors"],
        1,
        "needs floating-point weights: convert the file",
    ),
    (
        "bool weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/bool.safetensors"],
        1,
        "bool.safetensors: 1.weight is torch.bool",
    ),
    (
        "complex weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/complex64.safetensors"],
        1,
        "complex64.safetensors: 1.weight is torch.complex64",
    ),
    (
        "mixed-dtype weights",
        ["compress", "lenet-300-100", "--weights", "{tmp}/mixed.safetensors"],
        1,
        "the parameters of MLP have several dtypes: torch.float32 (e.g. 1.weight), torch.float64 "
        "(e.g. 3.weight)",
    ),
    (
        "zoo config nested 100k deep",
        ["compress", "mlp", "--zoo-config", '{{"a": ' * 100_000 + "1" + "}}" * 100_000],
        2,
        "argument --zoo-config: JSON nested too deeply",
    ),
    (
        "config nested 100k deep",
        ["compress", *LENET, "--config", "{tmp}/deep.json"],
        2,
        "config file {tmp}/deep.json is nested too deeply",
    ),
    (
        "keep as an option",
        ["compress", *LENET, "--option", "keep=0.1"],
        2,
        "keep is not a method option: use --keep 0.1",
    ),
    (
        "budget as an option",
        ["compress", *LENET, "--option", "budget=0.3"],
        2,
        "budget is not a method option: use --budget 0.3",
    ),
    (
        "keep as a config option",
        ["compress", *LENET, "--config", "{tmp}/keepopt.json"],
        2,
        "keep is not a method option: set it at the top level",
    ),
    (
        "reference without --reference-weights",
        ["evaluate", "{tmp}/A", "--reference", "lenet-300-100"],
        2,
        "--reference lenet-300-100 gives only the architecture: pass its weights with "
        "--reference-weights FILE",
    ),
    (
        "reference dir with --reference-weights",
        ["evaluate", "{tmp}/A", "--reference", "{tmp}/A", "--reference-weights", "{st}"],
        2,
        "--reference {tmp}/A holds its own weights: drop --reference-weights",
    ),
    # behaviour a user does not expect
    (
        "bare int keep=1",
        ["compress", *LENET, "--keep", "1"],
        1,
        "keep=1 (an int) would shrink every layer to ONE unit: pass keep=1.0",
    ),
]


@pytest.mark.parametrize("name,argv,code,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(tmp_path, capsys, lenet_files, name, argv, code, message):
    _bad_files(tmp_path, lenet_files)
    fmt = {"tmp": tmp_path, "st": lenet_files["st"], "whole": lenet_files["whole"]}
    argv = [a.format(**fmt) for a in argv]
    if argv[0] == "compress" and "-o" not in argv and "--config" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    before = tree(tmp_path)
    got, stdout, err = run(capsys, *argv)
    assert got == code, err
    assert message.format(**fmt) in err
    if code == 1:
        assert err.startswith("tropnnc: error: ") and err.count("\n") == 1  # one line
        assert "Traceback" not in err
    assert tree(tmp_path) == before  # no output, no temp dirs, inputs untouched


def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, lenet_files, monkeypatch):
    """SIGTERM while the output is being written: exit 143, nothing left behind."""

    def not_handled(signum, frame):
        raise RuntimeError("SIGTERM reached the default handler")

    def terminated_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        monkeypatch.setattr(io, "save_file", terminated_while_writing)
        before = tree(tmp_path)
        code, _, err = run(
            capsys,
            "compress",
            "lenet-300-100",
            "--weights",
            lenet_files["st"],
            "-o",
            tmp_path / "out",
        )
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (code, err) == (143, "tropnnc: error: terminated\n")
    assert tree(tmp_path) == before


def test_stale_staging_left_by_a_killed_run_is_cleaned(tmp_path, capsys, lenet_files):
    """A run killed while writing leaves .out.tropnnc-PID.*.tmp; the next run removes it
    (only when that process is gone), and restores a previous output it had set aside."""
    dead = 4_194_305  # above Linux's largest pid: never a running process
    stale = tmp_path / f".out.tropnnc-{dead}.k1ll3d.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tropnnc-{os.getppid()}.busy.tmp"  # a run still going
    live.mkdir()
    args = ["compress", "lenet-300-100", "--weights", lenet_files["st"], "-o", tmp_path / "out"]
    code, _, err = run(capsys, *args, "--keep", "0.5")
    assert code == 0, err
    assert not stale.exists() and live.is_dir()
    # killed between setting the previous output aside and moving the new one in
    backup = tmp_path / f".out.tropnnc-{dead}.s3t4s1de.old"
    backup.mkdir()
    (tmp_path / "out").rename(backup / "previous")
    other = tmp_path / f".other.tropnnc-{dead}.s3t4s1de.old"  # another target's: kept
    other.mkdir()
    code, _, err = run(capsys, *args, "--keep", "0.2")
    assert code == 1 and f"output {tmp_path / 'out'} already exists" in err  # restored first
    assert io.load(tmp_path / "out")[1].out_features == 150 and not backup.exists()
    assert other.is_dir()
    export = tmp_path / f".m.pt2.tropnnc-{dead}.x.tmp.pt2"
    export.write_bytes(b"half")
    code, _, err = run(capsys, "export", *args[1:4], "-o", tmp_path / "m.pt2")
    assert code == 0, err
    assert not export.exists()


def test_compress_input_shape_for_macs(tmp_path, capsys, nets, lenet_files):
    torch.manual_seed(0)
    model = io.load_model(f"{FACTORY_MODULE}:plain_cnn", random_init=True)
    save_file(model.state_dict(), str(tmp_path / "cnn.safetensors"))
    spec = [f"{FACTORY_MODULE}:plain_cnn", "--weights", tmp_path / "cnn.safetensors"]
    code, _, err = run(
        capsys, "compress", *spec, "-o", tmp_path / "a", "--budget", "0.5", "--budget-unit", "macs"
    )
    assert (
        code == 2
        and "--budget-unit macs needs the input shape of "
        f"{FACTORY_MODULE}:plain_cnn, which the model does not say: give --input-shape"
        in err
    )
    code, stdout, err = run(
        capsys,
        "compress",
        *spec,
        "-o",
        tmp_path / "b",
        "--budget",
        "0.5",
        "--budget-unit",
        "macs",
        "--input-shape",
        "1,10,10",
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    # conv1 8*1*9*64 + conv2 8*8*9*36 + fc 8*2 per sample
    assert data["macs_before"] == 4608 + 20736 + 16
    assert data["macs_after"] <= 0.5 * data["macs_before"] + 16
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input_shape"] == [1, 10, 10]
    code, stdout, _ = run(
        capsys,
        "compress",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "-o",
        tmp_path / "c",
        "--json",
    )  # the zoo network says its shape
    assert code == 0 and json.loads(stdout)["macs_before"] == 266200


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "-v", "info", tmp_path / "nope")
    assert (
        code == 1
        and "Traceback" in err
        and err.rstrip().endswith(
            f"tropnnc: error: model '{tmp_path / 'nope'}' not found: it is neither an existing "
            "file or directory, nor a zoo network ("
            + ", ".join(zoo.names())
            + "), nor a package.module:factory path"
        )
    )


def test_usage_errors_exit_2(capsys):
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "compress", "--nope")[0] == 2
    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and "compress" in stdout
    assert run(capsys, "--version")[0] == 0


# ------------------------------------------------------------------------------------------
# info, evaluate, export
# ------------------------------------------------------------------------------------------


def test_info_table_and_json(tmp_path, capsys):
    code, stdout, _ = run(capsys, "info", "vgg-small")
    assert code == 0
    assert "features.0" in stdout and "compressible -> features.3 (folds features.1)" in stdout
    assert "no: classifier.3 is an output layer (never compressed)" in stdout
    assert "9 compressible blocks" in stdout and "random initialization" in stdout
    code, stdout, _ = run(capsys, "info", "lenet-300-100", "--json")
    data = json.loads(stdout)
    assert data["params"] == 266610 and data["macs"] == 266200
    assert [
        (r["layer"], r["in"], r["out"], r["macs"], r["compressible"]) for r in data["layers"]
    ] == [("1", 784, 300, 235200, True), ("3", 300, 100, 30000, True), ("5", 100, 10, 1000, False)]
    code, _, err = run(capsys, "info", "lenet-300-100", "--input-shape", "3,5")
    assert code == 1 and "cannot run lenet-300-100 on an input of shape (3, 5)" in err


def test_evaluate_fidelity_and_inputs_file(tmp_path, capsys, lenet_files):
    out = tmp_path / "out"
    assert (
        run(
            capsys,
            "compress",
            "lenet-300-100",
            "--weights",
            lenet_files["st"],
            "-o",
            out,
            "--keep",
            "1.0",
        )[0]
        == 0
    )
    ref = ["--reference", "lenet-300-100", "--reference-weights", lenet_files["pt"]]
    code, stdout, err = run(capsys, "evaluate", out, *ref, "--samples", "200", "--json")
    assert code == 0, err
    fid = json.loads(stdout)["fidelity"]
    assert fid["samples"] == 200 and fid["relative_error"] < 1e-5
    assert fid["top1_agreement"] == 1.0
    torch.save(torch.rand(30, 1, 28, 28), tmp_path / "x.pt")
    code, stdout, _ = run(capsys, "evaluate", out, *ref, "--inputs", tmp_path / "x.pt")
    assert code == 0 and "top-1 agreement 1.0000" in stdout and "x.pt" in stdout
    code, _, err = run(capsys, "evaluate", out)
    assert code == 2 and "nothing to evaluate" in err
    torch.save(torch.rand(4, 7), tmp_path / "wrong.pt")
    code, _, err = run(capsys, "evaluate", out, *ref, "--inputs", tmp_path / "wrong.pt")
    assert code == 1 and "running the models on inputs of shape (4, 7) failed" in err


def test_evaluate_accuracy_on_fashion_mnist(tmp_path, capsys, lenet_files):
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    code, stdout, err = run(
        capsys,
        "evaluate",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "--dataset",
        "fashion-mnist",
        "--limit",
        "500",
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    first = Subset(get_dataset("fashion-mnist", "test"), range(500))
    expected = evaluate(io.load_model("lenet-300-100", weights=lenet_files["st"]), first)
    assert data["examples"] == 500 and data["accuracy"] == expected


def test_export_pt2_round_trip(tmp_path, capsys, lenet_files):
    out = tmp_path / "m.pt2"
    code, stdout, err = run(
        capsys, "export", "lenet-300-100", "--weights", lenet_files["st"], "--out", out
    )
    assert code == 0, err
    program = torch.export.load(str(out))
    model = io.load_model("lenet-300-100", weights=lenet_files["st"])
    x = torch.rand(5, 1, 28, 28)  # another batch size than the example: dynamic batch
    torch.testing.assert_close(program.module()(x), model(x))
    code, _, err = run(
        capsys, "export", "lenet-300-100", "--weights", lenet_files["st"], "--out", out
    )
    assert code == 1 and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.pt2",
        "w.pt",
        "w.safetensors",
        "whole.pt",
    ]
    code, _, err = run(capsys, "export", "lenet-300-100", "--out", tmp_path / "m.zip")
    assert code == 2 and "give --format pt2|onnx" in err


def test_export_onnx_needs_the_optional_package(tmp_path, capsys, lenet_files):
    import importlib.util

    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        code, _, err = run(
            capsys,
            "export",
            "lenet-300-100",
            "--weights",
            lenet_files["st"],
            "--out",
            tmp_path / "m.onnx",
        )
        assert code == 0, err
        assert (tmp_path / "m.onnx").stat().st_size > 0
    else:
        code, _, err = run(
            capsys,
            "export",
            "lenet-300-100",
            "--weights",
            lenet_files["st"],
            "--out",
            tmp_path / "m.onnx",
        )
        assert code == 1 and "export --format onnx needs the optional package(s)" in err
        assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------
# train, sweep, demo (tropnnc.experiments)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,module",
    [
        (["train", "mlp", "--dataset", "x", "--out", "o"], "tropnnc.experiments.train_cache"),
        (
            [
                "sweep",
                "--networks",
                "mlp",
                "--methods",
                "l1",
                "--keeps",
                "0.5",
                "--seeds",
                "0",
                "--dataset",
                "x",
                "--out",
                "o",
            ],
            "tropnnc.experiments.sweep",
        ),
        (["demo", "--out", "o"], "tropnnc.experiments.demo"),
    ],
)
def test_missing_experiments_module(tmp_path, capsys, monkeypatch, argv, module):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err == (
        f"tropnnc: error: this command needs {module}, which this installation of "
        "tropnnc does not have\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "mlp", "--out", "o"], "the following arguments are required: --dataset"),
        (
            ["train", "--dataset", "d", "--out", "o"],
            "the following arguments are required: network",
        ),
        (["sweep", "--out", "o"], "give --config FILE or the grid"),
        (["sweep", "--networks", "mlp", "--out", "o"], "the sweep needs --methods, --keeps"),
        (["sweep", "--keeps", "half", "--out", "o"], "invalid float value: 'half'"),
        (["demo"], "the following arguments are required: -o/--out"),
    ],
)
def test_experiment_commands_bad_args(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == []


TINY_MLP = {"sizes": [16, 12, 8, 3], "input_shape": [1, 4, 4]}


def _tiny(split: str) -> TensorDataset:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.rand(160 if split == "train" else 60, 1, 4, 4, generator=g)
    teacher = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


@pytest.fixture
def tiny_dataset():
    train_cache = pytest.importorskip("tropnnc.experiments.train_cache")
    train_cache.register_dataset("cli-tiny", _tiny, 3)
    return "cli-tiny"


def test_train_then_compress_tiny(tmp_path, capsys, tiny_dataset):
    out = tmp_path / "trained"
    code, stdout, err = run(
        capsys,
        "train",
        "mlp",
        "--dataset",
        tiny_dataset,
        "--seed",
        "1",
        "--epochs",
        "1",
        "--zoo-config",
        json.dumps(TINY_MLP),
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    assert json.loads(stdout)["test_accuracy"] == evaluate(io.load(out), _tiny("test"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["config"]["sizes"] == [16, 12, 8, 3]
    assert manifest["extra"]["training"]["seed"] == 1
    code, _, err = run(capsys, "compress", out, "-o", tmp_path / "small", "--keep", "0.5")
    assert code == 0, err
    assert io.load(tmp_path / "small")[1].out_features == 6


def test_sweep_tiny_with_config(tmp_path, capsys, tiny_dataset):
    pytest.importorskip("tropnnc.experiments.sweep")
    config = tmp_path / "sweep.json"
    config.write_text(
        json.dumps(
            {
                "networks": ["mlp"],
                "methods": ["l1"],
                "keeps": [0.5],
                "seeds": [0],
                "dataset": tiny_dataset,
                "configs": {"mlp": TINY_MLP},
                "train_kw": {"epochs": 1},
                "cache_dir": str(tmp_path / "cache"),
            }
        )
    )
    code, stdout, err = run(
        capsys, "sweep", "--config", config, "--out", tmp_path / "res", "--json"
    )
    assert code == 0, err
    assert Path(json.loads(stdout)["results"]).is_file()
    config.write_text(json.dumps({"networks": ["mlp"], "frobs": 1}))
    code, _, err = run(
        capsys,
        "sweep",
        "--config",
        config,
        "--methods",
        "l1",
        "--keeps",
        "0.5",
        "--seeds",
        "0",
        "--dataset",
        "d",
        "--out",
        tmp_path / "res2",
    )
    assert code == 2 and "unknown sweep setting(s) frobs" in err


def test_demo_passes_its_arguments(tmp_path, capsys, monkeypatch):
    demo = pytest.importorskip("tropnnc.experiments.demo")
    calls = []

    def fake_run_demo(out_dir, quick=False, **kw):
        calls.append((out_dir, quick, kw))
        Path(out_dir).mkdir()
        (Path(out_dir) / "table.md").write_text("| method | accuracy |\n")
        return Path(out_dir) / "table.md"

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    code, stdout, _ = run(capsys, "demo", "--out", tmp_path / "d", "--quick")
    assert code == 0 and "| method | accuracy |" in stdout
    assert calls == [(tmp_path / "d", True, {"progress": True})]


# ------------------------------------------------------------------------------------------
# the installed console script, in real processes
# ------------------------------------------------------------------------------------------


def test_console_script_compress_then_evaluate(tmp_path, lenet_files):
    script = Path(sys.executable).with_name("tropnnc")
    if not script.exists():
        script = shutil.which("tropnnc")
    if script is None:
        pytest.skip("the tropnnc console script is not installed (pip install -e .)")
    out = tmp_path / "small"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def tropnnc(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )

    done = tropnnc(
        "compress",
        "--model",
        "lenet-300-100",
        "--weights",
        lenet_files["st"],
        "--out",
        out,
        "--keep",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    assert "300 -> 150" in done.stdout
    done = tropnnc(
        "evaluate",
        out,
        "--reference",
        "lenet-300-100",
        "--reference-weights",
        lenet_files["st"],
        "--samples",
        "500",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    fid = json.loads(done.stdout)["fidelity"]
    assert fid["samples"] == 500 and 0 <= fid["relative_error"] < 1
    assert fid["top1_agreement"] * 500 == pytest.approx(round(fid["top1_agreement"] * 500))
    if fashion_mnist_available():
        done = tropnnc("evaluate", out, "--dataset", "fashion-mnist", "--split", "test", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["examples"] == 10000
    done = tropnnc(
        "compress", "--model", "lenet-300-100", "--weights", lenet_files["st"], "--out", out
    )
    assert done.returncode == 1
    assert (
        done.stderr == f"tropnnc: error: output {out} already exists (pass --overwrite to "
        "replace it)\n"
    )


def test_compress_narrows_attention_unless_told_not_to(tmp_path, capsys):
    """vit-mini's heads are narrowed by --keep (saved, loadable, in the plan);
    --no-attention leaves them as nn.MultiheadAttention."""
    torch.manual_seed(0)
    save_file(zoo.build("vit-mini").state_dict(), str(tmp_path / "vit.safetensors"))
    for flags, kind in (
        ((), "CompactMultiheadAttention"),
        (("--no-attention",), "MultiheadAttention"),
    ):
        out = tmp_path / f"out{len(flags)}"
        code, _, err = run(
            capsys,
            "compress",
            "vit-mini",
            "--weights",
            tmp_path / "vit.safetensors",
            "-o",
            out,
            "--keep",
            "0.5",
            *flags,
        )
        assert code == 0, err
        assert type(io.load(out).blocks[0].attn).__name__ == kind
        plan = json.loads((out / "manifest.json").read_text())["compression"]
        assert plan["attention"] is (not flags)
        assert ("blocks.0.attn" in plan["widths"]) is (not flags)


def test_info_lists_attention(capsys):
    """info shows an nn.MultiheadAttention as one row with its parameters and MACs, and
    counts the attention modules whose heads can be narrowed."""
    code, stdout, _ = run(capsys, "info", "vit-mini", "--json")
    assert code == 0
    data = json.loads(stdout)
    rows = {r["layer"]: r for r in data["layers"]}
    attn = rows["blocks.0.attn"]
    assert attn["type"] == "MultiheadAttention" and attn["status"] == "heads narrowable (2 x 8)"
    assert attn["params"] == 4 * 16 * 16 + 4 * 16 and attn["macs"] == 16 * 4 * 16 * 16
    assert "blocks.0.attn.out_proj" not in rows and data["attention"] == 2
    code, stdout, _ = run(capsys, "info", "vit-mini")
    assert "2 attention modules with narrowable heads" in stdout
