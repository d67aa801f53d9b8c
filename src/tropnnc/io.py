"""Model files: read models in every supported form, write compressed models without pickle.

Input forms (:func:`load_model`):

* a directory written by :func:`save` (``manifest.json`` + ``model.safetensors``);
* a :mod:`tropnnc.zoo` network name plus a weights file (``.safetensors`` or a ``torch.save``
  state_dict), with optional zoo constructor overrides;
* a ``package.module:factory`` import path (called with the config as keyword arguments) plus
  a weights file;
* a pickled whole module (``torch.save(model)``), only with ``trust_pickle=True``: unpickling
  can run arbitrary code, so every file is first read with ``torch.load(weights_only=True)``.

Output (:func:`save`): a directory with the weights as safetensors, ``manifest.json`` (format
version, how to rebuild the original architecture, the shape of every Linear/Conv2d layer and
the folded BatchNorms, the compression plan and the versions used) and the report
(``report.json``, ``report.txt``). :func:`load` builds the original architecture, swaps in
empty layers of the recorded shapes and loads the weights: no pickle involved. Everything is
written to a temporary directory next to the target and renamed into place, so a failed or
interrupted run leaves no partial output, and an existing output is replaced only when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import platform
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import zoo
from .api import CompressionResult
from .modules import CompactAttention, CompactMultiheadAttention
from .surgery import set_module

log = logging.getLogger(__name__)

FORMAT = "tropnnc-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PICKLED = "model.pt"  # only for models whose architecture has no zoo/factory description
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_STATE_KEYS = ("state_dict", "model_state_dict", "model")


class ModelFileError(ValueError):
    """A model file, directory or description that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def load_model(
    spec: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    zoo_config: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    random_init: bool = False,
) -> nn.Module:
    """Load a model from any supported form (see the module docstring).

    ``spec`` is a directory written by :func:`save`, a pickled-module file, a zoo network name
    or a ``package.module:factory`` path; the last two need ``weights`` (a state_dict file)
    unless ``random_init`` asks for freshly initialized weights. ``zoo_config`` overrides
    constructor arguments. Models built here come back in eval mode; a pickled module keeps
    the mode it was saved in. ``trust_pickle`` allows unpickling Python objects (never by default);
    ``trust_code`` allows a saved directory to import and call the factory it names.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        _no_weights_with(text, weights, "a model directory written by tropnnc")
        return load(path, trust_pickle=trust_pickle, trust_code=trust_code)
    if text in zoo.names():
        model = _build_zoo(text, zoo_config)
    elif _FACTORY.match(text) and not path.exists():
        model = _call_factory(text, zoo_config)
    elif path.is_file():
        _no_weights_with(text, weights, "a pickled module file")
        return _load_pickled_module(path, trust_pickle)
    else:
        raise ModelFileError(
            f"model {text!r} not found: it is neither an existing file or directory, nor a zoo "
            f"network ({', '.join(zoo.names())}), nor a package.module:factory path"
        )
    if weights is None:
        if random_init:
            return model.eval()
        raise ModelFileError(
            f"model {text!r} gives only the architecture: pass its weights "
            "(--weights FILE, a .safetensors or .pt state_dict)"
        )
    load_weights(
        model, read_state_dict(weights, trust_pickle=trust_pickle), source=weights, what=text
    )
    return model.eval()


def names_code(spec: str | os.PathLike[str]) -> bool:
    """True when loading ``spec`` imports and calls code: a ``package.module:factory`` path
    (not an existing file or a zoo name)."""
    text = os.fspath(spec)
    return text not in zoo.names() and _FACTORY.match(text) is not None and not Path(text).exists()


def read_state_dict(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save`` state_dict, on the CPU.

    Checkpoints that wrap the state_dict under ``state_dict``/``model_state_dict``/``model``
    are unwrapped; a pickled module (``trust_pickle`` only) gives its ``state_dict()``.
    """
    path = _existing_file(path, "weights file")
    if _is_safetensors(path):
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ModelFileError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    state = _as_state_dict(obj)
    if state is None:
        raise ModelFileError(
            f"{path}: expected a state_dict (a mapping from parameter names to "
            f"tensors), found {_describe_object(obj)}"
        )
    return state


def load_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike[str],
    what: str,
) -> None:
    """Load ``state`` into ``model`` after checking names and shapes; ModelFileError naming
    ``source`` and every mismatch otherwise. The model takes the file's floating dtype."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_some(shapes)}")
    if problems:
        raise ModelFileError(f"{os.fspath(source)} does not match {what}: {'; '.join(problems)}")
    not_float = [
        f"{k} is {state[k].dtype}"
        for k in expected
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    if not_float:
        raise ModelFileError(
            f"{os.fspath(source)}: {_some(not_float)}; {what} needs "
            "floating-point weights: convert the file (e.g. to float32)"
        )
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
        model.load_state_dict(state, strict=True)
    else:  # mixed precision: keep every tensor's own dtype
        model.load_state_dict(state, strict=True, assign=True)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of a model directory written by :func:`save`."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such model directory")
    file = folder / MANIFEST
    if not file.is_file():
        raise ModelFileError(f"{folder} is not a tropnnc model directory (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{file}: corrupt manifest ({exc})") from None
    except RecursionError:
        raise ModelFileError(f"{file}: corrupt manifest (JSON nested too deeply)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{file}: not a tropnnc manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{file}: unknown manifest format version {version!r} (this is "
            f"tropnnc {_version()}, which reads version {FORMAT_VERSION})"
        )
    for key in ("architecture", "layers", "weights"):
        if not isinstance(manifest.get(key), dict):
            raise ModelFileError(
                f"{file}: corrupt manifest ({key!r} must be a JSON object, "
                f"found {type(manifest.get(key)).__name__})"
            )
    layers = manifest["layers"]
    bad = [name for name, rec in layers.items() if not isinstance(rec, dict)]
    if bad:
        raise ModelFileError(
            f"{file}: corrupt manifest ('layers' entry {bad[0]!r} is not an "
            "object describing the layer)"
        )
    weights = manifest["weights"]
    for key in ("file", "sha256"):
        if not isinstance(weights.get(key), str):
            raise ModelFileError(
                f"{file}: corrupt manifest ('weights' has no {key!r} string; "
                "the weights file and its sha256 must both be recorded)"
            )
    _inside(folder, weights["file"], file, "weights.file")
    arch = manifest["architecture"]
    if arch.get("kind") == "pickle":
        if not isinstance(arch.get("file"), str):
            raise ModelFileError(f"{file}: corrupt manifest ('architecture' has no 'file')")
        _inside(folder, arch["file"], file, "architecture.file")
    return manifest


def _inside(folder: Path, name: str, manifest: Path, key: str) -> Path:
    """``folder / name``, refused unless it is a file name directly inside ``folder``."""
    path = folder / name
    if (
        Path(name).name != name
        or name in ("", ".", "..")
        or path.resolve().parent != folder.resolve()
    ):
        raise ModelFileError(
            f"{manifest}: {key} {name!r} points outside the model directory; "
            "a manifest may only name files inside its own directory"
        )
    return path


def load(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, trust_code: bool = False
) -> nn.Module:
    """Rebuild a model saved by :func:`save` (in eval mode, on the CPU).

    Builds the original architecture from the manifest, replaces every layer whose recorded
    shape differs by an empty one of that shape (folded BatchNorms by Identity), checks the
    weights file against its recorded sha256 and loads it. A factory architecture is imported
    and called only with ``trust_code``; a pickled one only with ``trust_pickle``.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    weights = folder / manifest["weights"]["file"]
    _existing_file(weights, "weights file")
    if _sha256(weights) != manifest["weights"]["sha256"]:
        raise ModelFileError(
            f"{weights} does not match {folder / MANIFEST} (sha256 differs): "
            "the file was modified, truncated or replaced"
        )
    arch = manifest["architecture"]
    kind = arch.get("kind") if isinstance(arch, dict) else None
    if kind == "zoo":
        model = _build_zoo(arch["name"], arch.get("config"))
        what = f"zoo network {arch['name']}"
    elif kind == "factory":
        if not trust_code:
            raise ModelFileError(
                f"{folder / MANIFEST} names the factory {arch['factory']}: loading it imports "
                "and runs that code; pass trust_code=True (--trust-code) if you trust it"
            )
        model = _call_factory(arch["factory"], arch.get("config"))
        what = f"factory {arch['factory']}"
    elif kind == "pickle":
        model = _load_pickled_module(folder / arch["file"], trust_pickle)
        what = f"pickled module {folder / arch['file']}"
    else:
        raise ModelFileError(f"{folder / MANIFEST}: unknown architecture kind {kind!r}")
    if kind != "pickle":
        model = _reshape(model, manifest["layers"], folder / MANIFEST, what)
    load_weights(
        model,
        read_state_dict(weights),
        source=weights,
        what=f"the layers recorded in {folder / MANIFEST}",
    )
    if manifest.get("input_shape") and getattr(model, "input_shape", None) is None:
        model.input_shape = tuple(manifest["input_shape"])
    return model.eval()


def _build_zoo(name: str, config: Mapping[str, Any] | None) -> nn.Module:
    if name not in zoo.names():
        raise ModelFileError(f"unknown zoo network {name!r}; valid: {', '.join(zoo.names())}")
    try:
        return zoo.build(name, **dict(config or {}))
    except TypeError as exc:
        raise ModelFileError(f"bad zoo config for {name}: {exc}") from None


def _call_factory(path: str, config: Mapping[str, Any] | None) -> nn.Module:
    """Import ``package.module:attr`` and call it with ``config``; the result must be a Module."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelFileError(f"cannot import {module_name!r} for factory {path}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelFileError(f"factory {path}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFileError(f"factory {path} is not callable")
    try:
        model = obj(**dict(config or {}))
    except Exception as exc:
        raise ModelFileError(f"factory {path} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"factory {path} returned {_describe_object(model)}, not a torch.nn.Module"
        )
    model.tropnnc_factory = path
    model.tropnnc_factory_config = dict(config or {})
    return model


def _load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    if _as_state_dict(obj) is not None:
        raise ModelFileError(
            f"{path} holds a state_dict (weights only): name the architecture "
            f"too, e.g. --model NETWORK --weights {path}"
        )
    raise ModelFileError(f"{path}: expected a torch.nn.Module, found {_describe_object(obj)}")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; the full unpickler only with trust_pickle."""
    if _is_safetensors(path):
        raise ModelFileError(
            f"{path} holds weights only (safetensors): name the architecture "
            f"too, e.g. --model NETWORK --weights {path}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise ModelFileError(
                f"{path}: corrupt or unreadable PyTorch file ({_first_line(exc)})"
            ) from None
        if not trust_pickle:
            raise ModelFileError(
                f"{path} is a pickle of Python objects ({found.group(1)}), not just tensors; it "
                "was not loaded because unpickling can run arbitrary code: pass --trust-pickle "
                "(trust_pickle=True) only for files you trust"
            ) from None
    except Exception as exc:  # truncated zip archives, wrong magic numbers, ...
        raise ModelFileError(
            f"{path}: corrupt or truncated PyTorch file ({_first_line(exc)})"
        ) from None
    log.warning("unpickling %s with trust_pickle=True", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: cannot unpickle ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header size, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + size <= path.stat().st_size


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _as_state_dict(inner)
    return None


def _reshape(
    model: nn.Module, layers: Mapping[str, Mapping[str, Any]], manifest: Path, what: str
) -> nn.Module:
    """Replace every layer of ``model`` whose description differs from the recorded one."""
    for path, record in layers.items():
        try:
            current = model.get_submodule(path) if path else model
        except AttributeError:
            raise ModelFileError(f"{manifest}: layer {path!r} is not part of {what}") from None
        if _layer_record(current) == dict(record):
            continue
        new = _empty_layer(dict(record), manifest, path)
        if path:
            set_module(model, path, new)
        else:
            model = new
    return model


#: the attention layers compress writes (:mod:`tropnnc.modules`), by record class
_ATTENTION = {cls.__name__: cls for cls in (CompactAttention, CompactMultiheadAttention)}


def _layer_record(module: nn.Module) -> dict[str, Any] | None:
    """The JSON description of a Linear, Conv2d, Identity or compact attention layer (None
    for other modules)."""
    if type(module) in _ATTENTION.values():
        return {"class": type(module).__name__, **module.config()}
    if type(module) is nn.Linear:
        return {
            "class": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if type(module) is nn.Conv2d:
        return {
            "class": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": jsonable(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    if type(module) is nn.Identity:
        return {"class": "Identity"}
    return None


def _empty_layer(record: dict[str, Any], manifest: Path, path: str) -> nn.Module:
    """An uninitialized layer of the recorded shape (its weights are loaded next)."""
    kind = record.get("class")
    sizes = {
        k: v
        for k, v in record.items()
        if k
        in (
            *("in_features", "out_features", "in_channels", "out_channels", "groups"),
            *("dim", "heads", "qk_dim", "v_dim", "dim_out"),  # compact attention
        )
    }
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ModelFileError(
            f"{manifest}: bad record for layer {path!r} (sizes must be "
            f"positive integers, got {bad})"
        )
    try:
        if kind == "Linear":
            return nn.utils.skip_init(
                nn.Linear, record["in_features"], record["out_features"], bias=record["bias"]
            )
        if kind == "Conv2d":
            padding = record["padding"]
            return nn.utils.skip_init(
                nn.Conv2d,
                record["in_channels"],
                record["out_channels"],
                tuple(record["kernel_size"]),
                tuple(record["stride"]),
                padding if isinstance(padding, str) else tuple(padding),
                tuple(record["dilation"]),
                record["groups"],
                record["bias"],
                record["padding_mode"],
            )
        if kind == "Identity":
            return nn.Identity()
        if kind in _ATTENTION:
            config = {k: v for k, v in record.items() if k != "class"}
            return _ATTENTION[kind](**config)  # its q, k, v, proj records follow
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{manifest}: bad record for layer {path!r} ({type(exc).__name__}: {exc})"
        ) from None
    raise ModelFileError(f"{manifest}: layer {path!r} has unknown class {kind!r}")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model``'s original architecture without pickle, or None if unknown."""
    if getattr(model, "zoo_name", None) in zoo.names():
        return {
            "kind": "zoo",
            "name": model.zoo_name,
            "config": jsonable(getattr(model, "zoo_config", {})),
        }
    if isinstance(getattr(model, "tropnnc_factory", None), str):
        return {
            "kind": "factory",
            "factory": model.tropnnc_factory,
            "config": jsonable(getattr(model, "tropnnc_factory_config", {})),
        }
    return None


def save(
    obj: CompressionResult | nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a compressed (or any) model to the directory ``path``; return its path.

    ``obj`` is a :class:`~tropnnc.api.CompressionResult` (its report and plan are written
    too) or a plain module. For a result, ``settings`` adds what it does not hold (keep,
    strict, radius or input domain, calibration, budget, source) to the manifest's plan (the
    result itself records each block's radius and the input domain); ``extra`` is stored
    as is (e.g. training metadata). A model built neither by the zoo nor by a factory is
    additionally pickled (``model.pt``; loading it then needs ``trust_pickle``). The
    directory appears complete or not at all; an existing one is replaced only with
    ``overwrite`` and only if it is a tropnnc model directory or empty.
    """
    result = obj if isinstance(obj, CompressionResult) else None
    model = result.model if result is not None else obj
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"save: expected a CompressionResult or torch.nn.Module, got {type(obj).__name__}"
        )
    target = Path(path)
    arch = architecture_of(model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    layers = {
        name: rec for name, mod in model.named_modules() if (rec := _layer_record(mod)) is not None
    }
    plan = None
    if result is not None:
        plan = {
            **dict(settings or {}),
            **result.to_dict(),
            "widths": {b.layer: b.units_after for b in result.blocks},
        }
    input_shape = getattr(model, "input_shape", None)
    with staged(target, overwrite=overwrite, directory=True) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if arch is None:
            try:
                torch.save(model, tmp / PICKLED)
            except Exception as exc:
                raise ModelFileError(
                    f"cannot save {target}: the model was built neither by tropnnc.zoo nor by a "
                    f"factory, and pickling it failed ({type(exc).__name__}: {exc})"
                ) from None
            arch = {"kind": "pickle", "file": PICKLED}
            log.warning(
                "%s: the model has no zoo or factory description; its architecture is "
                "pickled to %s (loading needs trust_pickle)",
                target,
                PICKLED,
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": arch,
            "input_shape": None if input_shape is None else list(input_shape),
            "layers": layers,
            "weights": {
                "file": WEIGHTS,
                "sha256": _sha256(tmp / WEIGHTS),
                "dtypes": sorted({str(v.dtype) for v in state.values()}),
            },
            "compression": plan,
            "versions": {
                "tropnnc": _version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        if extra:
            manifest["extra"] = dict(extra)
        _write_json(tmp / MANIFEST, manifest)
        if result is not None:
            _write_json(tmp / REPORT_JSON, plan)
            (tmp / REPORT_TXT).write_text(result.table() + "\n")
    log.info("wrote %s", target)
    return target


@contextlib.contextmanager
def staged(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = True
) -> Iterator[Path]:
    """Stage an output next to ``path`` and move it into place when the block succeeds.

    Yields a fresh temporary directory (``directory=True``, renamed to ``path``) or a
    temporary file path in the same folder (renamed over ``path`` with ``os.replace``). On
    any error, including KeyboardInterrupt, the staging area and any parent folders created
    for it are removed. An existing ``path`` is an error unless ``overwrite``.
    """
    target = Path(path)
    clean_stale(target)
    check_output(target, overwrite=overwrite, directory=directory)
    created: list[Path] = []
    tmp: Path | None = None
    done = False
    try:
        created = _make_parents(target.parent)
        if directory:
            tmp = Path(
                tempfile.mkdtemp(prefix=_stage_prefix(target), suffix=".tmp", dir=target.parent)
            )
        else:
            fd, name = tempfile.mkstemp(
                prefix=_stage_prefix(target), suffix=f".tmp{target.suffix}", dir=target.parent
            )
            os.close(fd)
            tmp = Path(name)
        yield tmp
        _commit(tmp, target, overwrite, directory)
        done = True
    except OSError as exc:
        raise ModelFileError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if not done:
            if tmp is not None:
                _remove(tmp)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def check_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = True
) -> None:
    """Fail early when ``path`` cannot be written (exists without overwrite, wrong kind)."""
    target = Path(path)
    if not (target.exists() or target.is_symlink()):
        for parent in target.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ModelFileError(f"cannot write {target}: {parent} is not a directory")
                break
        return
    if not overwrite:
        raise ModelFileError(f"output {target} already exists (pass --overwrite to replace it)")
    if directory:
        if not target.is_dir():
            raise ModelFileError(f"cannot overwrite {target}: it is not a directory")
        if any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise ModelFileError(
                f"refusing to overwrite {target}: it is neither empty nor a "
                f"tropnnc model directory (no {MANIFEST})"
            )
    elif target.is_dir():
        raise ModelFileError(f"cannot overwrite {target}: it is a directory")


def _commit(tmp: Path, target: Path, overwrite: bool, directory: bool) -> None:
    check_output(target, overwrite=overwrite, directory=directory)
    if not directory:
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        return
    os.chmod(tmp, 0o777 & ~_umask())
    for file in tmp.iterdir():
        os.chmod(file, 0o666 & ~_umask())
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # one atomic step: tmp now holds the previous output
        _remove(tmp)
        return
    # no atomic exchange here: the previous output waits in a recognisable backup folder
    # until the new one is in place; if the process dies in between, the next run restores
    # it (clean_stale)
    old = Path(tempfile.mkdtemp(prefix=_stage_prefix(target), suffix=".old", dir=target.parent))
    try:
        os.rename(target, old / "previous")
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old / "previous", target)
            raise
    finally:  # also when the first rename fails: no empty backup folder is left
        _remove(old)


#: staging entries this module writes next to an output: .NAME.tropnnc-PID.RANDOM.tmp[SUFFIX]
#: (the new output being written) and .NAME.tropnnc-PID.RANDOM.old (the previous output)
_STAGE = re.compile(r"^\.(?P<name>.+)\.tropnnc-(?P<pid>\d+)\.[^.]+\.(?P<kind>tmp|old)(\..*)?$")


def _stage_prefix(target: Path) -> str:
    return f".{target.name}.tropnnc-{os.getpid()}."


def clean_stale(path: str | os.PathLike[str]) -> None:
    """Remove what an earlier run that was killed left next to ``path`` (staging entries of
    processes that no longer run); a previous output that was waiting in a backup while the
    target is missing is moved back to ``path`` first."""
    target = Path(path)
    try:
        entries = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return
    for entry in entries:
        found = _STAGE.match(entry.name)
        if found is None or _alive(int(found["pid"])):
            continue
        if found["kind"] == "old":  # a previous output set aside: only for this target
            if found["name"] != target.name:
                continue
            previous = entry / "previous"
            if previous.exists() and not (target.exists() or target.is_symlink()):
                with contextlib.suppress(OSError):
                    os.rename(previous, target)
                    log.warning("restored %s from %s, left by an interrupted run", target, entry)
        log.info("removing %s, left by an interrupted run", entry)
        _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def check_not_input(
    out: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None]
) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (what -> path;
    paths that do not exist, like zoo names, are ignored): writing or replacing it would
    destroy or change an input."""
    target = Path(out).resolve()
    for what, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if source == target:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ModelFileError(
            f"output {out} {relation} the input {what} {given}: writing it "
            "would destroy or change that input; choose another --out"
        )


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    created = []
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except OSError:
            for done in reversed(created):
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise
        created.append(parent)
    return created


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Strict-JSON data: tuples as lists, NaN/inf as null, dataclasses and dtypes spelled out."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _write_json(path: Path, data: Any) -> None:
    """Indented JSON with lists of numbers kept on one line each."""
    text = json.dumps(jsonable(data), indent=1, allow_nan=False)
    text = re.sub(
        r'\[\n\s*([^\[\]{}"]*?)\n\s*\]',
        lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
        text,
    )
    path.write_text(text + "\n")


def _version() -> str:
    from . import __version__  # lazily: the package may import this module while initializing

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise ModelFileError(f"{what} {file} does not exist")
    if not file.is_file():
        raise ModelFileError(f"{what} {file} is not a regular file")
    return file


def _no_weights_with(spec: str, weights: object, kind: str) -> None:
    if weights is not None:
        raise ModelFileError(f"{spec} is {kind}, which holds its own weights: drop --weights")


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {_some([repr(k) for k in obj])}"
    return f"a {type(obj).__name__}"
