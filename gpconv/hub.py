"""Share converted models as people share models: safetensors weights and a conversion record.

A model from :func:`gpconv.convert` cannot be rebuilt from its base architecture alone: its pointwise
layers are grouped blocks whose shapes the base model does not have. Its **conversion record**
(:func:`gpconv.core.convert.conversion_record`: the channels per group of every grouped layer, a
layer not named staying dense, and ``version``, ``l_layer``, ``activation``, ``linear``; here with
``gpconv_version`` added) says how to convert a freshly built base model again
(:func:`gpconv.core.convert.apply_conversion`). It is stored under the key ``"gpconv"`` of the
folder's ``config.json``.

:func:`save_pretrained` writes ``config.json`` and ``model.safetensors`` in the layout of the model's
library: ``model.save_pretrained`` for transformers (the record in its config, as ``config.gpconv``),
``timm.models.save_for_hf`` for timm (the record beside ``architecture`` and ``pretrained_cfg``),
and for any other module (torchvision's) a ``config.json`` holding the record alone.
:func:`from_pretrained` builds the base model again (from the config for transformers and timm; given
by the caller otherwise), converts it as recorded and loads the weights: outputs are identical.
:func:`create_model` is timm's ``create_model`` with a conversion: ``create_model("resnet50",
channels_per_group=16)`` gives a k-variant of any timm model, and ``create_model("local-dir:FOLDER",
pretrained=True)`` (or ``"hf-hub:USER/REPO"``) a saved one.

transformers, timm and safetensors (the ``interop`` extra) are imported inside the functions only:
``import gpconv`` needs torch alone. A folder is read from the disk; a repository id is fetched with
``huggingface_hub`` (not reachable where gpconv is developed: the tests use local folders).
"""

from __future__ import annotations

import json
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

from torch import nn

from .core.block import GroupedPointwiseConv2d
from .core.convert import apply_conversion, convert
from .core.convert import conversion_record as _convert_record
from .io import atomic_write, atomic_write_text, existing_outputs

__all__ = ["RECORD_KEY", "CONFIG_FILE", "WEIGHTS_FILE", "conversion_record", "apply_record", "save_pretrained",
           "from_pretrained", "create_model"]

RECORD_KEY = "gpconv"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # the name transformers, timm and huggingface_hub use
_TIMM_SOURCES = ("local-dir:", "hf-hub:")

PathLike = Union[str, Path]


def _has_unrecorded_activation(model: nn.Module) -> bool:
    """True when a block applies an activation the record cannot name (an ``nn.Module`` given to convert)."""
    return any(not isinstance(layer.act, nn.Identity) for module in model.modules()
               if isinstance(module, GroupedPointwiseConv2d) for layer in module.layers)


def _gpconv_version() -> str:
    try:
        return metadata.version("gpconv")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout that is not installed
        return "unknown"


def conversion_record(model: nn.Module) -> Dict[str, Any]:
    """The conversion record of a model from :func:`gpconv.convert` (or loaded by this module), with the
    gpconv version that wrote it: what :func:`save_pretrained` stores.

    ValueError (one line) for a model ``convert`` did not build, one without grouped layers, and one
    whose blocks apply an activation given as an ``nn.Module`` (a record names activations by word).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"conversion_record expects an nn.Module, got {type(model).__name__}")
    record = _convert_record(model)
    if record is None:
        raise ValueError("the model has no conversion record: build it with gpconv.convert or gpconv.hub.create_model")
    if not record["channels_per_group"]:
        raise ValueError("the model has no grouped pointwise layers: there is no conversion to record")
    if record["activation"] is None and _has_unrecorded_activation(model):
        raise ValueError("the blocks' activation was given as a module, which a record cannot name: convert with an "
                         "activation word (\"relu\", \"swish\"...) to save the model")
    return {**record, "gpconv_version": _gpconv_version()}


def apply_record(model: nn.Module, record: Any, *, where: str = "the record") -> nn.Module:
    """A converted copy of ``model`` (a freshly built base model) as ``record`` says
    (:func:`gpconv.core.convert.apply_conversion`; convert's notes, given when the model was first
    converted, are not repeated). ValueError (one line, naming ``where``) when ``record`` is not a
    conversion record or names layers the base model cannot group. The new blocks are freshly
    initialised: load the weights next (:func:`from_pretrained` does, and refuses weights of another shape).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where} holds no gpconv conversion record (key {RECORD_KEY!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return apply_conversion(model, record)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from None


def _library(model: nn.Module) -> str:
    """``"transformers"``, ``"timm"`` or ``"torch"``: whose conventions the model's folder follows."""
    config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return "transformers"
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and type(model).__module__.startswith("timm."):
        return "timm"
    return "torch"


def _state_dict_for_safetensors(model: nn.Module) -> Dict[str, Any]:
    """The state dict with tensors that share memory cloned (safetensors refuses shared storage)."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        tensors[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    return tensors


def save_pretrained(model: nn.Module, folder: PathLike, *, overwrite: bool = False) -> Path:
    """Write a converted model to ``folder``: ``config.json`` (with the conversion record) and
    ``model.safetensors``, in the layout of the model's library (see the module docstring).

    FileExistsError (one line, nothing written) when ``folder`` already holds one of those files and
    ``overwrite`` is false; ValueError when the model has no conversion to record. Returns ``folder``.
    """
    record = conversion_record(model)
    folder = Path(folder)
    found = existing_outputs(folder, (CONFIG_FILE, WEIGHTS_FILE)) if folder.is_dir() else []
    if found and not overwrite:
        raise FileExistsError(f"{folder} already holds {', '.join(found)}: pass overwrite=True to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    library = _library(model)
    if library == "transformers":
        setattr(model.config, RECORD_KEY, record)
        model.save_pretrained(folder, safe_serialization=True)
    elif library == "timm":
        import timm.models

        timm.models.save_for_hf(model, folder, model_config={RECORD_KEY: record}, safe_serialization=True)
    else:
        from safetensors.torch import save

        tensors = _state_dict_for_safetensors(model)
        atomic_write(folder / WEIGHTS_FILE, lambda out: out.write(save(tensors, metadata={"format": "pt"})))
        atomic_write_text(folder / CONFIG_FILE, json.dumps({RECORD_KEY: record}, indent=2) + "\n")
    return folder


def _local_folder(source: PathLike) -> Path:
    """A folder on the disk, or the files of a hub repository id fetched with huggingface_hub."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file: from_pretrained reads a folder (config.json, model.safetensors)")
    if str(source).count("/") != 1 or str(source).startswith((".", "/")) or path.parent.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (nor a hub repository id USER/NAME)")
    from huggingface_hub import snapshot_download  # not reachable where gpconv is developed

    return Path(snapshot_download(str(source), allow_patterns=[CONFIG_FILE, "*.safetensors"]))


def _read_config(folder: Path) -> Dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: it was not written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def _load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` (safetensors) into ``model``, every tensor and no other; ValueError (one line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from None
    try:
        result = model.load_state_dict(state, strict=False)
        problems = [f"missing {key}" for key in result.missing_keys] + [f"unexpected {key}" for key in
                                                                         result.unexpected_keys]
    except RuntimeError as error:  # shapes that differ: torch lists them on the lines after the first
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    if problems:
        raise ValueError(f"{path} does not fit the converted model: {problems[0]} ({len(problems)} tensors differ)")
    return model


def _transformers_model(folder: Path, model_class: Any) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    record = getattr(config, RECORD_KEY, None)
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"{folder / CONFIG_FILE} names no transformers architecture: pass model_class")
        model_class = getattr(transformers, architectures[0])
    base = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    converted = apply_record(base, record, where=str(folder / CONFIG_FILE))
    setattr(converted.config, RECORD_KEY, conversion_record(converted))
    return _load_weights(converted, folder / WEIGHTS_FILE).eval()


def from_pretrained(source: PathLike, model: Optional[nn.Module] = None, *, model_class: Any = None) -> nn.Module:
    """Load a converted model written by :func:`save_pretrained`: build the base model, convert it as
    its record says (:func:`apply_record`), load ``model.safetensors`` (every tensor must fit).

    Args:
        source: a folder, or a hub repository id ``USER/NAME`` (fetched with huggingface_hub).
        model: the freshly built base model, for folders of plain torch modules (torchvision's); not
            needed for transformers and timm folders, whose config names the architecture.
        model_class: transformers only, the class to build (default: the config's ``architectures``).

    transformers models come back in eval mode, as from ``from_pretrained``; timm's and the others in
    the mode ``create_model`` or ``model`` had. FileNotFoundError / ValueError (one line) for a folder
    that is missing, not written by ``save_pretrained``, or whose weights do not fit.
    """
    folder = _local_folder(source)
    config = _read_config(folder)
    if "model_type" in config:
        return _transformers_model(folder, model_class)
    if "architecture" in config and "pretrained_cfg" in config:
        return create_model(f"local-dir:{folder}", pretrained=True)
    record = config.get(RECORD_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"{folder / CONFIG_FILE} holds no gpconv conversion record (key {RECORD_KEY!r})")
    if model is None:
        raise ValueError(f"{folder} holds a converted model whose architecture gpconv cannot build: pass model=<the "
                         "base model, freshly built>")
    return _load_weights(apply_record(model, record, where=str(folder / CONFIG_FILE)), folder / WEIGHTS_FILE)


def _timm_record(model_name: str) -> Optional[Dict[str, Any]]:
    """The conversion record of a ``local-dir:`` or ``hf-hub:`` timm model, None when it has none."""
    source, _, location = model_name.partition(":")
    if source == "local-dir":
        config = _read_config(Path(location))
    else:
        from huggingface_hub import hf_hub_download  # not reachable where gpconv is developed

        config = _read_config(Path(hf_hub_download(location, CONFIG_FILE)).parent)
    return config.get(RECORD_KEY)


def _classifier_patterns(model: nn.Module) -> Iterable[str]:
    """The classifier's module names, from timm's ``pretrained_cfg["classifier"]`` (kept dense)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or ())
    modules = dict(model.named_modules())
    return [name for name in names if name in modules]


def create_model(model_name: str, pretrained: bool = False, *, channels_per_group: Optional[int] = None,
                 version: Optional[int] = None, l_layer: Optional[bool] = None, activation: Optional[str] = None,
                 exclude: Optional[Iterable[str]] = None, linear: Optional[bool] = None, **kwargs) -> nn.Module:
    """timm's ``create_model`` with its pointwise layers grouped: a k-variant of any timm model.

    * A timm model name (``"resnet50"``, ``"efficientnet_b0.ra_in1k"``): ``timm.create_model(model_name,
      pretrained, **kwargs)``, then :func:`gpconv.convert` with the given settings (defaults: 16
      channels per group, version 2, with L, no activation, ``linear=False``; ``exclude`` defaults to
      timm's classifier, ``pretrained_cfg["classifier"]``, which stays dense). With ``pretrained=True``
      the dense weights are timm's; the grouped blocks start from scratch: fine-tune.
    * ``"local-dir:FOLDER"`` or ``"hf-hub:USER/NAME"`` of a model written by :func:`save_pretrained`:
      the recorded architecture and conversion, and with ``pretrained=True`` its weights (timm's
      ``load_pretrained``: a different ``num_classes`` drops the classifier, as in timm). Leave the
      conversion settings out: the record gives them.

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``drop_rate``...). ValueError (one line)
    for conversion settings given with a recorded model; timm's own errors for unknown names.
    """
    import timm

    settings = dict(channels_per_group=channels_per_group, version=version, l_layer=l_layer, activation=activation,
                    exclude=exclude, linear=linear)
    record = _timm_record(model_name) if model_name.startswith(_TIMM_SOURCES) else None
    if record is None:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        defaults = dict(channels_per_group=16, exclude=_classifier_patterns(model))
        chosen = {key: value for key, value in settings.items() if value is not None}
        return convert(model, **{**defaults, **chosen})
    given = [key for key, value in settings.items() if value is not None]
    if given:
        raise ValueError(f"{model_name} records its conversion: leave {', '.join(given)} out")
    model = apply_record(timm.create_model(model_name, pretrained=False, **kwargs), record, where=model_name)
    if pretrained:
        from timm.models import load_pretrained

        load_pretrained(model, model.pretrained_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get("in_chans", 3))
    return model
