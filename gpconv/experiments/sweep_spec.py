"""Sweep configs: the keys of a sweep (YAML file or ``gpconv sweep`` flags; see
:mod:`gpconv.experiments.sweep` for each key), checked and expanded into one :class:`RunSpec` per
training run. Nothing here trains or writes: :mod:`gpconv.experiments.sweep` runs the specs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..models import check_input_size, list_models
from . import DATASETS  # the names (numpy-free)
from .config import ModelConfig, TrainConfig, field_default, non_negative_int, positive_float, positive_int
from .paper_numbers import VERSION_PATTERN, parse_variant

__all__ = ["RunSpec", "TRAIN_KEYS", "SWEEP_KEYS", "OPTION_RULES", "expand_variants", "check_options", "expand_runs",
           "load_sweep_config"]

# the options of one training run a sweep config sets: these TrainConfig fields, and the ModelConfig
# fields its variant name does not give
_TRAIN_CONFIG_KEYS = ("dataset", "data_dir", "epochs", "batch_size", "lr", "max_train_batches", "val_flips", "augment",
                      "monitor", "seed", "precise_bn_batches", "lr_cycle")
_MODEL_CONFIG_KEYS = ("image_size", "skip_strides", "classifier_init", "width")


def _defaults(kind, names: Sequence[str]) -> Dict[str, object]:
    by_name = {item.name: item for item in fields(kind)}
    return {name: field_default(by_name[name]) for name in names}


# keys of a sweep config that are options of one training run, with their defaults (the dataclasses':
# the papers' protocol; None for the required dataset)
TRAIN_KEYS: Dict[str, object] = {**_defaults(TrainConfig, _TRAIN_CONFIG_KEYS),
                                 **_defaults(ModelConfig, _MODEL_CONFIG_KEYS)}
SWEEP_KEYS = set(TRAIN_KEYS) | {"seeds", "tag", "arch", "variants", "channels_per_group", "groups", "table", "description",
                                "notes"}
# the argparse types of the matching ``gpconv sweep`` / ``gpconv train`` flags; YAML values pass through them too
OPTION_RULES: Dict[str, Callable] = {
    "image_size": positive_int, "skip_strides": non_negative_int, "epochs": positive_int, "batch_size": positive_int,
    "lr": positive_float, "max_train_batches": positive_int, "seed": non_negative_int,
    "precise_bn_batches": non_negative_int, "channels_per_group": positive_int, "lr_cycle": positive_int,
    "width": positive_float,
}
_TEMPLATE = re.compile(rf"^v(?:{VERSION_PATTERN})((-noL|-relu)*)$")
# a run folder's name (and a group's tag): one path component, no leading dot
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class RunSpec:
    """One training run of a sweep: its folder name, model variant and training options."""

    name: str
    arch: str
    variant: str
    options: Dict[str, object] = field(default_factory=dict)  # TRAIN_KEYS
    tag: str = ""  # a group's ``tag``: appended to the run name (``baseline-keras-init``)

    def model_config(self, num_classes: int = 10):
        """The :class:`~gpconv.experiments.config.ModelConfig` of this run (``activation`` None: the family's default)."""
        variant = parse_variant(self.variant)
        return ModelConfig(self.arch, num_classes=num_classes, channels_per_group=variant.channels_per_group,
                           version=variant.version, l_layer=variant.l_layer, activation=variant.activation,
                           skip_strides=int(self.options["skip_strides"]), image_size=int(self.options["image_size"]),
                           classifier_init=str(self.options["classifier_init"]),
                           width=float(self.options.get("width", 1.0)))

    def train_config(self, output: Path):
        return TrainConfig(output=str(output), **{k: self.options[k] for k in _TRAIN_CONFIG_KEYS})


def expand_variants(variants: Sequence[str], channels_per_group: Sequence[int]) -> List[str]:
    """Full variant names: templates (``v2``, ``v2-noL``, ``v2-relu``) are expanded over
    ``channels_per_group`` (``v2-16ch``, ``v2-16ch-noL`` ...); full names are kept. Each name is
    checked with :func:`~gpconv.experiments.paper_numbers.parse_variant` (ValueError on an unknown one)."""
    names: List[str] = []
    for variant in variants:
        variant = str(variant).strip()
        template = _TEMPLATE.match(variant)
        if template:
            if not channels_per_group:
                raise ValueError(f"variant template {variant!r} needs channels_per_group (e.g. --channels-per-group "
                                 "4,8,16)")
            expanded = [f"{variant[:2]}-{int(n)}ch{template.group(1)}" for n in channels_per_group]
        else:
            expanded = [variant]
        for name in expanded:
            parse_variant(name)
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("the sweep has no variants")
    return names


def _check_keys(mapping: dict, where: str) -> None:
    unknown = sorted(set(mapping) - SWEEP_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(SWEEP_KEYS))}")


def check_options(options: dict, where: str, key: Optional[str] = None) -> dict:
    """``options`` with every numeric value checked (and converted) by the rule of its CLI flag
    (:data:`OPTION_RULES`), booleans and ``monitor`` checked too; ValueError (one line, naming the key,
    or ``key`` when given: an element of a list such as ``seeds``) otherwise."""
    import argparse

    checked = dict(options)
    for name, rule in OPTION_RULES.items():
        value = checked.get(name)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise argparse.ArgumentTypeError(f"expected a single value, got {value!r}")
            checked[name] = rule(str(value))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{key or name} in {where}: {error}") from None
    for key in ("val_flips", "augment"):
        if key in checked and not isinstance(checked[key], bool):
            raise ValueError(f"{key} in {where}: expected true or false, got {checked[key]!r}")
    if checked.get("monitor", "val_accuracy") not in ("val_accuracy", "val_loss"):
        raise ValueError(f"monitor in {where}: expected val_accuracy or val_loss, got {checked['monitor']!r}")
    if checked.get("data_dir") is not None and not isinstance(checked["data_dir"], str):
        raise ValueError(f"data_dir in {where}: expected a path, got {checked['data_dir']!r}")
    return checked


def _as_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{name} must be a list or a comma-separated string, got {value!r}")


def expand_runs(config: dict, overrides: Optional[dict] = None) -> List[RunSpec]:
    """The runs of a sweep ``config`` (a mapping as in the module docstring). ``overrides`` (e.g.
    reduced-scale flags: ``epochs``, ``max_train_batches``, ``data_dir``) replace the config's values
    in every group; ``None`` values in ``overrides`` are ignored."""
    if not isinstance(config, dict):
        raise ValueError("a sweep config must be a mapping of keys (arch, variants, dataset, ...)")
    _check_keys(config, "the sweep config")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "the overrides")
    base = {k: v for k, v in config.items() if k != "groups"}
    groups = config.get("groups") or [{}]
    if not isinstance(groups, list):
        raise ValueError("groups must be a list of mappings")
    specs: List[RunSpec] = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise ValueError(f"group {index + 1} must be a mapping")
        _check_keys(group, f"group {index + 1}")
        merged = {**TRAIN_KEYS, **base, **group, **overrides}
        arch = merged.get("arch")
        if arch not in list_models():
            raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(list_models())}")
        if merged.get("dataset") not in DATASETS:
            raise ValueError(f"group {index + 1} ({arch}): dataset must be one of {', '.join(DATASETS)}, got "
                             f"{merged.get('dataset')!r}")
        where = f"group {index + 1} ({arch})"
        cpg = [check_options({"channels_per_group": n}, where)["channels_per_group"]
               for n in _as_list(merged.get("channels_per_group"), "channels_per_group")]
        try:
            variants = expand_variants(_as_list(merged.get("variants"), "variants"), cpg)
        except ValueError as error:
            raise ValueError(f"variants in {where}: {error}") from None
        unset = [k for k, default in TRAIN_KEYS.items() if merged[k] is None and default is not None]
        if unset:
            raise ValueError(f"{unset[0]} in {where}: expected a value, got null (leave the key out for its default)")
        options = check_options({k: merged[k] for k in TRAIN_KEYS}, where)
        check_input_size(arch, options["image_size"], options["skip_strides"])
        seeds = [check_options({"seed": n}, where, key="seeds")["seed"] for n in _as_list(merged.get("seeds"), "seeds")]
        seeds = seeds or [options["seed"]]
        tag = merged.get("tag")
        if tag is not None and not (isinstance(tag, (str, int)) and not isinstance(tag, bool)
                                    and _NAME.match(str(tag))):
            raise ValueError(f"tag in {where}: expected a word of letters, digits, '-', '_' or '.' (it ends the run "
                             f"folder's name), got {tag!r}")
        for seed in seeds:
            for variant in variants:
                spec = RunSpec(variant, arch, variant, {**options, "seed": seed}, str(tag or ""))
                spec.train_config(Path("unused"))  # checks epochs, batch_size ... (one-line ValueError)
                spec.model_config()  # checks classifier_init
                specs.append(spec)
    return _name_runs(specs)


def _name_runs(specs: List[RunSpec]) -> List[RunSpec]:
    """Name each run by its variant, prefixed with what varies across the sweep (arch, dataset, image
    size) and followed by its width, tag and seed where needed; ValueError (one line) on a name that is
    not a plain folder name or that two runs share."""
    varying = [key for key in ("arch", "dataset", "image_size")
               if len({_dimension(spec, key) for spec in specs}) > 1]
    seed_varies = len({spec.options["seed"] for spec in specs}) > 1
    for spec in specs:
        suffix = [f"w{spec.options['width']:g}"] if spec.options["width"] != 1.0 else []  # baseline-w0.37
        suffix += [spec.tag] if spec.tag else []
        suffix += [f"seed{spec.options['seed']}"] if seed_varies else []
        spec.name = "-".join([_dimension(spec, key) for key in varying] + [spec.variant] + suffix)
    seen = set()
    for spec in specs:
        if not _NAME.match(spec.name):  # one folder inside --output, never a path out of it
            raise ValueError(f"run name {spec.name!r} is not a plain folder name")
        if spec.name in seen:
            raise ValueError(f"run {spec.name!r} appears twice in the sweep")
        seen.add(spec.name)
    return specs


def _dimension(spec: RunSpec, key: str) -> str:
    if key == "arch":
        return spec.arch
    if key == "image_size":
        return f"{spec.options['image_size']}px"
    return str(spec.options[key])


def load_sweep_config(path) -> dict:
    """Read a YAML sweep config (one-line errors for a missing or malformed file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise ValueError("reading YAML sweep configs needs pyyaml (pip install pyyaml)") from None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of keys (arch, variants, dataset, ...)")
    return config

