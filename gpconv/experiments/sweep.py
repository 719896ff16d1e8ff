"""Sweeps: a set of training runs (one run folder per model variant), resumable.

A sweep is described by a YAML file (``configs/*.yaml``) or by ``gpconv sweep`` flags. Keys (YAML)
or flags (``--channels-per-group`` etc.):

``arch``
    a registered architecture (``gpconv.models.list_models()``).
``variants``
    names as in the papers (``baseline``, ``v2-16ch``, ``v1-32ch-noL``, ``v2-8ch-relu``) or
    templates without a channel count (``v2``, ``v2-noL``, ``v2-relu``, ``v1``) that are expanded
    over ``channels_per_group``.
``channels_per_group``
    the channel counts the templates are expanded over (e.g. ``[2, 4, 8, 16, 32]``).
``dataset``, ``data_dir``, ``image_size``, ``skip_strides``, ``epochs``, ``batch_size``, ``lr``,
``max_train_batches``, ``val_flips``, ``augment``, ``monitor``, ``seed``, ``lr_cycle``,
``precise_bn_batches``, ``classifier_init``, ``width``
    the training options of :class:`gpconv.experiments.config.TrainConfig` / ``gpconv train``
    (``width``: the width multiplier of ``gpconv train --width``; a run with a width other than 1
    gets ``-wW`` after its variant, ``baseline-w0.37``).
``tag``
    optional word appended to the names of a group's runs (``baseline-keras-init``), for groups that
    run the same variants with other options.
``seeds``
    optional list of seeds: every variant is run once per seed, and the run folders get a
    ``-seedN`` suffix (``v2-16ch-seed1``).
``groups``
    optional list of mappings, each overriding the keys above for its own runs (e.g. one group per
    architecture of a paper table). Run folders are named by the variant (``baseline``,
    ``v2-16ch-noL``) or, when the sweep has more than one architecture or dataset, prefixed by them
    (``mobilenet_v3_large-v2-16ch``).

Every run folder gets what ``gpconv train`` writes (``metrics.json`` ...) plus ``tta.json``: the test
accuracy and loss of the best weights with and without horizontal-flip test-time augmentation.
A run whose folder holds ``metrics.json`` and ``tta.json`` is finished and skipped when the sweep is
run again; a run with ``last.pt`` but no ``metrics.json`` (interrupted) is resumed from ``last.pt``.
Both are refused (one line) when a setting that shapes the result differs from the saved run's
(:func:`gpconv.experiments.checkpoint.resume_differences`; ``epochs`` may grow). Numeric keys of a YAML config
follow the rules of the ``gpconv sweep`` flags (:data:`OPTION_RULES`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .data import DATASETS
from ..models import check_input_size, list_models
from .paper_numbers import VERSION_PATTERN, parse_variant
from .config import ModelConfig, TrainConfig, field_default, non_negative_int, positive_float, positive_int

__all__ = ["RunSpec", "load_sweep_config", "expand_runs", "run_sweep", "TRAIN_KEYS", "SWEEP_KEYS", "TTA_FILE",
           "OPTION_RULES", "check_options", "read_sweep_plan"]

TTA_FILE = "tta.json"
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
    # prefix the run names with what varies across the sweep (arch, dataset, image size)
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


def run_is_finished(folder: Path) -> bool:
    return (Path(folder) / "metrics.json").is_file() and (Path(folder) / TTA_FILE).is_file()


def write_tta(folder: Path, splits, model_config, batch_size: int = 64, device: str = "cpu") -> dict:
    """Evaluate ``folder/best.pt`` on the test split with and without horizontal-flip TTA and write
    ``folder/tta.json`` (atomically)."""
    from ..io import atomic_write_text
    from .checkpoint import load_checkpoint
    from .distributed import setup_distributed
    from .metrics import evaluate_model

    context = setup_distributed(device)
    checkpoint = load_checkpoint(Path(folder) / "best.pt", map_location=context.device)
    model = model_config.build()
    model.load_state_dict(checkpoint["model"])
    model = model.to(context.device)
    plain = evaluate_model(model, splits.test, splits.num_classes, batch_size=batch_size, context=context)
    flipped = evaluate_model(model, splits.test, splits.num_classes, batch_size=batch_size, hflip_tta=True,
                             context=context)
    result = {"test_accuracy": plain.accuracy, "test_loss": plain.loss,
              "test_accuracy_hflip_tta": flipped.accuracy, "test_loss_hflip_tta": flipped.loss,
              "test_images": plain.count, "epoch": checkpoint["epoch"]}
    atomic_write_text(Path(folder) / TTA_FILE, json.dumps(result, indent=2))
    return result


def run_sweep(specs: Sequence[RunSpec], output, *, threads: Optional[int] = None, device: str = "cpu",
              log: Callable[[str], None] = print) -> List[dict]:
    """Train every run of ``specs`` in ``output/<run name>`` in this process, skipping finished runs
    and resuming interrupted ones. Returns one summary per run (name, status, test accuracies)."""
    import torch

    from .data import load_dataset
    from ..io import OutputError, check_writable, existing_outputs
    from .distributed import check_device
    from .run_folder import RUN_FILES, read_tta
    from .training import TrainingDiverged, train

    if not specs:
        raise ValueError("the sweep has no runs")
    check_device(device)
    output = Path(output)
    if existing_outputs(output, RUN_FILES):
        raise OutputError(f"{output} is the folder of one training run, not of a sweep: choose another --output")
    if threads:
        torch.set_num_threads(threads)
    plan = _merged_plan(output, specs)  # refuses a foreign sweep.json
    for spec in specs:  # every saved run must have this sweep's settings: checked before anything is written
        if spec.options["dataset"] != "synthetic" and spec.options["data_dir"] is None:
            raise ValueError(f"run {spec.name}: dataset {spec.options['dataset']} needs data_dir (or --data-dir)")
        _check_saved_run(output / spec.name, spec, device)
    pending = [plan]

    def write_plan_once():  # after the checks and the first dataset: a sweep refused before writes nothing
        if pending:
            check_writable(output)
            _write_plan(output, pending.pop())

    cached_splits: Dict[tuple, object] = {}
    summaries = []
    started = time.perf_counter()
    for number, spec in enumerate(specs, 1):
        folder = output / spec.name
        head = f"[{number}/{len(specs)}] {spec.name}"
        if run_is_finished(folder):
            write_plan_once()
            log(f"{head}: finished before ({folder / 'metrics.json'}), skipped")
            summaries.append({"name": spec.name, "status": "skipped", **read_tta(folder / TTA_FILE)})
            continue
        key = (spec.options["dataset"], spec.options["data_dir"], spec.options["image_size"], spec.options["seed"],
               spec.options["val_flips"])
        if key not in cached_splits:
            cached_splits[key] = load_dataset(key[0], key[1], image_size=key[2], seed=key[3], val_flips=key[4])
        splits = cached_splits[key]
        write_plan_once()
        model_config = spec.model_config(splits.num_classes)
        config = spec.train_config(folder)
        config.device = device
        run_started = time.perf_counter()
        if not (folder / "metrics.json").is_file():
            resuming = (folder / "last.pt").is_file()
            log(f"{head}: {'resuming' if resuming else 'training'} {spec.arch} {spec.variant} on "
                f"{spec.options['dataset']} ({config.epochs} epochs) -> {folder}")
            try:
                train(config, model_config, resume=True, splits=splits,
                      log=lambda line: log(f"  {spec.name}: {line}"))
            except TrainingDiverged as error:
                log(f"{head}: diverged, skipped ({error})")
                summaries.append({"name": spec.name, "status": "diverged"})
                continue
        tta = write_tta(folder, splits, model_config, config.eval_batch_size, device)
        log(f"{head}: test accuracy {tta['test_accuracy']:.4f}, with H-flip TTA {tta['test_accuracy_hflip_tta']:.4f} "
            f"({time.perf_counter() - run_started:.0f} s; sweep {time.perf_counter() - started:.0f} s)")
        summaries.append({"name": spec.name, "status": "trained", **tta})
    return summaries


def read_sweep_plan(path) -> List[dict]:
    """The runs of a ``sweep.json`` (each a mapping with a ``name``); :class:`RunFileError` (one line
    naming the file and the field) when it is not a gpconv sweep plan."""
    from .run_folder import RunFileError, read_json_object

    runs = read_json_object(path, {"runs": ((list,), "a list of runs", True)})["runs"]
    for index, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            raise RunFileError(f"{path}: runs[{index}] is not a run with a name")
    return runs


def _check_saved_run(folder: Path, spec: RunSpec, device: str) -> None:
    """Refuse (one line) a run folder whose saved settings differ from ``spec``'s: a finished run
    (``metrics.json``: its ``config.json``) or an interrupted one (``last.pt``)."""
    from .checkpoint import RESUME_KEYS, load_checkpoint, resume_differences
    from .run_folder import read_run_config

    if (folder / "metrics.json").is_file():
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} holds a finished run without config.json: its settings cannot be checked; "
                             "move it away or choose another --output")
        saved = read_run_config(folder / "config.json")
        saved = {"model_config": saved["model"], "train_config": saved["train"],
                 "class_names": list(saved.get("class_names") or [])}
    elif (folder / "last.pt").is_file():
        saved = load_checkpoint(folder / "last.pt", require=RESUME_KEYS)
    else:
        return
    names = saved["class_names"]  # the dataset is not loaded yet; training checks the class names again
    config = spec.train_config(folder)
    config.device = device
    differences = resume_differences(saved, config, spec.model_config(len(names) or 10), names)
    if differences:
        raise ValueError(f"{folder} was trained with other settings: {'; '.join(differences)}; use the saved "
                         "settings or choose another --output")


def _merged_plan(output: Path, specs: Sequence[RunSpec]) -> List[dict]:
    """The runs ``sweep.json`` will list: those of an earlier ``sweep.json`` that ``specs`` do not name
    (a sweep run with ``--only`` keeps the others), then ``specs``'. Refused when ``sweep.json`` is not
    gpconv's."""
    from ..io import OutputError
    from .run_folder import RunFileError

    path = output / "sweep.json"
    try:
        earlier = read_sweep_plan(path) if path.exists() else []
    except RunFileError as error:
        raise OutputError(f"{error}: it is not a gpconv sweep plan; choose another --output") from None
    names = {s.name for s in specs}
    return [r for r in earlier if r["name"] not in names] + [
        {"name": s.name, "arch": s.arch, "variant": s.variant, "options": s.options} for s in specs]


def _write_plan(output: Path, runs: List[dict]) -> None:
    """Write ``sweep.json`` (the runs of :func:`_merged_plan`)."""
    from ..io import atomic_write_text

    atomic_write_text(output / "sweep.json", json.dumps({"runs": runs}, indent=2))
