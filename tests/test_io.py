"""Model files: every input form, the pickle-free output directory, atomic writes, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tropnnc
from tropnnc import io, zoo
from tropnnc.io import ModelFileError

FACTORY_MODULE = "tropnnc_test_factories"
FACTORIES = textwrap.dedent('''
    """Factories for the tests: importable as package.module:factory."""
    from torch import nn


    def bn_cnn(channels=4, hidden=12, num_classes=3):
        """Conv-BN-ReLU-pool-conv-ReLU-FC-ReLU-FC on 1x8x8 inputs (a BatchNorm to fold)."""
        model = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(channels, channels, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(channels * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        model.input_shape = (1, 8, 8)
        return model


    def gelu_mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 2))


    def not_a_module():
        return 3


    def broken():
        raise RuntimeError("boom")
''')


@pytest.fixture(scope="session")
def factories(tmp_path_factory) -> Path:
    """A folder on sys.path holding the factory module (and its path for subprocesses)."""
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORIES)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(FACTORY_MODULE, None)


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.build("lenet-300-100")


def bn_cnn(factories: Path, seed: int = 0) -> nn.Module:
    """The factory CNN with non-trivial BatchNorm statistics, built through load_model."""
    torch.manual_seed(seed)
    model = io.load_model(f"{FACTORY_MODULE}:bn_cnn", random_init=True)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return model


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (to see leftovers and changes)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip_zoo_bitwise(tmp_path):
    result = tropnnc.compress(lenet(), 0.3, "tropnnc")
    out = io.save(result, tmp_path / "out", settings={"keep": 0.3})
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "report.json",
        "report.txt",
    ]
    loaded = io.load(out)
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(loaded(x), result.model.eval()(x))
    assert not loaded.training
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["architecture"] == {
        "kind": "zoo",
        "name": "lenet-300-100",
        "config": {},
    }
    assert manifest["layers"]["1"] == {
        "class": "Linear",
        "in_features": 784,
        "out_features": 90,
        "bias": True,
    }
    plan = manifest["compression"]
    assert plan["method"] == "tropnnc" and plan["keep"] == 0.3 and plan["seed"] == 0
    assert plan["widths"] == {"1": 90, "3": 30}
    assert len(plan["blocks"][0]["assignment"]) == 300
    assert plan["blocks"][0]["certificate"] > 0
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["tropnnc"] == tropnnc.__version__
    assert "parameters 266610 -> " in (out / "report.txt").read_text()
    assert json.loads((out / "report.json").read_text())["params_before"] == 266610


def test_round_trip_in_a_fresh_process_is_bitwise(tmp_path, factories):
    """compress -> save here; load in a new interpreter (factory, BN folded) -> same bits."""
    result = tropnnc.compress(bn_cnn(factories), 0.5, "tropnnc")
    out = io.save(result, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["factory"] == f"{FACTORY_MODULE}:bn_cnn"
    assert manifest["layers"]["1"] == {"class": "Identity"}  # the folded BatchNorm
    x = torch.rand(8, 1, 8, 8)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        import tropnnc.io
        model = tropnnc.io.load({str(out)!r}, trust_code=True)
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        with torch.no_grad():
            save_file({{"y": model(x)}}, {str(tmp_path / "y.safetensors")!r})
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(factories), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    with torch.no_grad():
        expected = result.model.eval()(x)
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_compresses_and_round_trips_in_its_dtype(tmp_path, dtype):
    model = lenet().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tropnnc.compress(model, 0.5)
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = io.load(io.save(result, tmp_path / "out"))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.rand(4, 1, 28, 28, dtype=dtype)
    assert torch.equal(loaded(x), result.model.eval()(x))
    # the compressed half model stays close to the float64 computation of the same merge
    # (of the same rounded weights: a clustering of other weights may group other units)
    ref = tropnnc.compress(lenet().to(dtype).double(), 0.5).model.eval()
    torch.testing.assert_close(loaded(x).double(), ref(x.double()), atol=0.02, rtol=0.02)


def test_training_mode_model_eval_semantics_and_mode_restored(factories):
    model = bn_cnn(factories).train()
    modes = [m.training for m in model.modules()]
    result = tropnnc.compress(model, 1.0)
    assert [m.training for m in model.modules()] == modes  # untouched
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_plain_module_without_description_is_pickled_and_needs_trust(tmp_path):
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    out = io.save(tropnnc.compress(model, 3), tmp_path / "out")
    assert json.loads((out / "manifest.json").read_text())["architecture"]["kind"] == "pickle"
    with pytest.raises(ModelFileError, match="pass --trust-pickle .*only for files you trust"):
        io.load(out)
    loaded = io.load(out, trust_pickle=True)
    assert loaded[0].out_features == 3


def test_saving_a_plain_model_writes_no_report(tmp_path):
    out = io.save(lenet(), tmp_path / "out", extra={"training": {"epochs": 1}})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compression"] is None and manifest["extra"] == {"training": {"epochs": 1}}
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(io.load(out)(x), lenet().eval()(x))


# ------------------------------------------------------------------------------------------
# input forms
# ------------------------------------------------------------------------------------------


def test_zoo_name_with_safetensors_pt_and_checkpoint_dicts(tmp_path):
    model = lenet(1)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    save_file(model.state_dict(), str(tmp_path / "w.bin"))  # safetensors by content
    x = torch.rand(3, 1, 28, 28)
    for name in ("w.safetensors", "w.pt", "ckpt.pt", "w.bin"):
        loaded = io.load_model("lenet-300-100", weights=tmp_path / name)
        assert torch.equal(loaded(x), model.eval()(x)), name
        assert not loaded.training


def test_zoo_config_overrides_and_factory_with_weights(tmp_path, factories):
    torch.manual_seed(0)
    mlp = zoo.build("mlp", sizes=[6, 5, 2])
    save_file(mlp.state_dict(), str(tmp_path / "mlp.safetensors"))
    loaded = io.load_model(
        "mlp", weights=tmp_path / "mlp.safetensors", zoo_config={"sizes": [6, 5, 2]}
    )
    assert loaded.zoo_config == {"sizes": [6, 5, 2]}
    cnn = bn_cnn(factories)
    save_file(cnn.state_dict(), str(tmp_path / "cnn.safetensors"))
    again = io.load_model(f"{FACTORY_MODULE}:bn_cnn", weights=tmp_path / "cnn.safetensors")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(again(x), cnn.eval()(x))
    assert again.tropnnc_factory == f"{FACTORY_MODULE}:bn_cnn"


def test_pickled_module_needs_the_flag(tmp_path):
    model = lenet()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(
        ModelFileError,
        match=r"whole.pt is a pickle of Python objects "
        r"\(tropnnc.zoo.MLP\).*--trust-pickle",
    ):
        io.load_model(tmp_path / "whole.pt")
    loaded = io.load_model(tmp_path / "whole.pt", trust_pickle=True)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_mixed_dtype_state_dict_keeps_each_dtype(tmp_path):
    model = lenet()
    state = model.state_dict()
    state["5.weight"] = state["5.weight"].half()
    save_file(state, str(tmp_path / "mixed.safetensors"))
    loaded = io.load_model("lenet-300-100", weights=tmp_path / "mixed.safetensors")
    assert loaded[5].weight.dtype == torch.float16 and loaded[1].weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file(lenet().state_dict(), str(path))
    return path


def test_truncated_and_garbage_safetensors(tmp_path, weights):
    data = weights.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("half", "junk", "empty"):
        with pytest.raises(
            ModelFileError,
            match=rf"{name}.safetensors: corrupt or truncated "
            "safetensors file",
        ):
            io.load_model("lenet-300-100", weights=tmp_path / f"{name}.safetensors")


def test_truncated_torch_file(tmp_path):
    torch.save(lenet().state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="cut.pt: corrupt or truncated PyTorch file"):
        io.load_model("lenet-300-100", weights=tmp_path / "cut.pt")


def test_state_dict_of_another_network(weights):
    with pytest.raises(
        ModelFileError,
        match=r"w.safetensors does not match e2-cnn: missing "
        r"keys features.0.weight.*unexpected keys "
        r"1.bias, 1.weight",
    ):
        io.load_model("e2-cnn", weights=weights)
    with pytest.raises(
        ModelFileError,
        match=r"does not match mlp: shape mismatch: 1.weight is "
        r"\(300, 784\) in the file, \(200, 784\)",
    ):
        io.load_model("mlp", weights=weights, zoo_config={"sizes": [784, 200, 100, 10]})


def test_missing_paths_and_bad_specs(tmp_path, weights, factories):
    with pytest.raises(ModelFileError, match="weights file .*nope.pt does not exist"):
        io.load_model("lenet-300-100", weights=tmp_path / "nope.pt")
    with pytest.raises(ModelFileError, match="model 'no-such-net' not found: .*zoo network"):
        io.load_model("no-such-net")
    with pytest.raises(ModelFileError, match="gives only the architecture: pass its weights"):
        io.load_model("lenet-300-100")
    with pytest.raises(ModelFileError, match="holds weights only .*--model NETWORK --weights"):
        io.load_model(weights)
    with pytest.raises(ModelFileError, match="bad zoo config for lenet-300-100"):
        io.load_model("lenet-300-100", weights=weights, zoo_config={"width": 3})
    with pytest.raises(ModelFileError, match="cannot import 'no_such_pkg.mod'"):
        io.load_model("no_such_pkg.mod:build", random_init=True)
    with pytest.raises(ModelFileError, match="has no attribute 'nothing'"):
        io.load_model(f"{FACTORY_MODULE}:nothing", random_init=True)
    with pytest.raises(ModelFileError, match="returned a int, not a torch.nn.Module"):
        io.load_model(f"{FACTORY_MODULE}:not_a_module", random_init=True)
    with pytest.raises(ModelFileError, match="broken failed: RuntimeError: boom"):
        io.load_model(f"{FACTORY_MODULE}:broken", random_init=True)


def test_manifest_problems(tmp_path, factories):
    out = io.save(tropnnc.compress(lenet(), 0.5), tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    bad = tmp_path / "bad"

    def variant(name: str, change) -> Path:
        folder = bad / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        data = json.loads(json.dumps(manifest))
        text = change(data)
        (folder / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(data))
        return folder

    cases = {
        "version": (
            lambda d: d.update(format_version=99),
            "unknown manifest format version 99 .*reads version 1",
        ),
        "format": (lambda d: d.update(format="other"), "not a tropnnc manifest"),
        "json": (lambda d: "{not json", "corrupt manifest"),
        "arch": (
            lambda d: d["architecture"].update(kind="magic"),
            "unknown architecture kind 'magic'",
        ),
        "layer": (
            lambda d: d["layers"].update({"9": {"class": "Linear"}}),
            "layer '9' is not part of zoo network lenet-300-100",
        ),
        "shape": (
            lambda d: d["layers"]["1"].update(out_features=91),
            r"model.safetensors does not match the layers recorded in .*shape mismatch",
        ),
        "record": (
            lambda d: d["layers"]["1"].update({"class": "Conv3d"}),
            "layer '1' has unknown class 'Conv3d'",
        ),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ModelFileError, match=message):
            io.load(variant(name, change))
    with pytest.raises(ModelFileError, match="is not a tropnnc model directory"):
        io.load(tmp_path)
    corrupted = variant("sha", lambda d: None)
    data = bytearray((corrupted / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupted / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="model.safetensors does not match .*sha256"):
        io.load(corrupted)
    factory_dir = io.save(tropnnc.compress(bn_cnn(factories), 0.5), tmp_path / "factory")
    with pytest.raises(
        ModelFileError, match=f"names the factory {FACTORY_MODULE}:bn_cnn.*--trust-code"
    ):
        io.load(factory_dir)


# ------------------------------------------------------------------------------------------
# atomic output
# ------------------------------------------------------------------------------------------


def test_existing_output_needs_overwrite_and_only_replaces_model_dirs(tmp_path):
    result = tropnnc.compress(lenet(), 0.5)
    out = io.save(result, tmp_path / "out")
    before = tree(tmp_path)
    with pytest.raises(ModelFileError, match=r"output .*out already exists \(pass --overwrite"):
        io.save(result, out)
    assert tree(tmp_path) == before
    other = tropnnc.compress(lenet(), 0.2)
    io.save(other, out, overwrite=True)
    assert io.load(out)[1].out_features == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup left
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(
        ModelFileError,
        match="refusing to overwrite .*precious: it is neither empty nor a tropnnc model directory",
    ):
        io.save(result, tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"


def test_failed_or_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    result = tropnnc.compress(lenet(), 0.5)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save(result, tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []  # parents it created are gone too
    (tmp_path / "file").write_text("a regular file")
    monkeypatch.undo()
    with pytest.raises(ModelFileError, match="cannot write .*file/out: .*file is not a directory"):
        io.save(result, tmp_path / "file" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_staged_file_replaces_atomically(tmp_path):
    target = tmp_path / "x.bin"
    with io.staged(target, directory=False) as tmp:
        tmp.write_bytes(b"one")
    with pytest.raises(RuntimeError), io.staged(target, overwrite=True, directory=False) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_overwrite_swaps_in_one_atomic_step(tmp_path, monkeypatch):
    """The previous output stays at the target until the new one replaces it: no rename
    ever moves it away first (it is exchanged with the staged directory)."""
    out = io.save(tropnnc.compress(lenet(), 0.5), tmp_path / "out")
    rename = os.rename

    def no_moving_the_target_away(src, dst):
        if Path(src) == out:
            raise AssertionError("the previous output was moved away before the swap")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", no_moving_the_target_away)
    io.save(tropnnc.compress(lenet(), 0.2), out, overwrite=True)
    assert io.load(out)[1].out_features == 60
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_BETWEEN_RENAMES = """
import os, sys
import torch
import tropnnc
from tropnnc import io, zoo

io._exchange = lambda a, b: False  # a file system without an atomic exchange
rename = os.rename

def killed(src, dst):
    if os.path.basename(dst) == "out":
        os._exit(9)  # SIGKILL-like: no cleanup code runs
    rename(src, dst)

os.rename = killed
torch.manual_seed(0)
io.save(tropnnc.compress(zoo.build("lenet-300-100"), 0.2), sys.argv[1], overwrite=True)
"""


def test_killed_overwrite_without_atomic_exchange_is_recovered(tmp_path):
    out = io.save(tropnnc.compress(lenet(), 0.5), tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 9, done.stderr
    assert not out.exists()  # the window the exchange closes
    left = sorted(p.name.rsplit(".", 2)[-1] for p in tmp_path.iterdir())
    assert left == ["old", "tmp"]  # the previous output, set aside, and the new one
    io.clean_stale(out)  # what the next run does first
    assert io.load(out)[1].out_features == 150
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_overwrite_leaves_no_empty_backup(tmp_path, monkeypatch):
    out = io.save(tropnnc.compress(lenet(), 0.5), tmp_path / "out")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False, raising=False)
    rename = os.rename

    def refused(src, dst):
        if Path(src) == out:
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(ModelFileError, match="cannot write .*out: Permission denied"):
        io.save(tropnnc.compress(lenet(), 0.2), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert io.load(out)[1].out_features == 150
