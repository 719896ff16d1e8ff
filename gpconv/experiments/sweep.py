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

The keys are read and expanded into runs by :mod:`gpconv.experiments.sweep_spec` (whose names this
module re-exports); this module runs them and keeps the sweep's plan (``sweep.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..io import (FolderBusy, OutputError, atomic_write_text, check_not_a_file, check_writable, existing_outputs,
                  folder_lock, folder_locked)
from .run_folder import RUN_FILES, RUN_LOCK, RunFileError, read_json_object, read_run_config, read_tta
from .sweep_spec import (OPTION_RULES, SWEEP_KEYS, TRAIN_KEYS, RunSpec, check_options, expand_runs, expand_variants,
                         load_sweep_config)

__all__ = ["RunSpec", "load_sweep_config", "expand_runs", "run_sweep", "TRAIN_KEYS", "SWEEP_KEYS", "TTA_FILE",
           "OPTION_RULES", "check_options", "read_sweep_plan", "expand_variants", "run_is_finished", "write_tta"]

TTA_FILE = "tta.json"


def run_is_finished(folder: Path) -> bool:
    """Whether the run folder holds both ``metrics.json`` and ``tta.json`` (a sweep skips it)."""
    return (Path(folder) / "metrics.json").is_file() and (Path(folder) / TTA_FILE).is_file()


def write_tta(folder: Path, splits, model_config, batch_size: int = 64, device: str = "cpu") -> dict:
    """Evaluate ``folder/best.pt`` on the test split with and without horizontal-flip TTA and write
    ``folder/tta.json`` (atomically)."""
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
    from .distributed import check_device
    from .training import TrainingDiverged, train

    if not specs:
        raise ValueError("the sweep has no runs")
    check_device(device)
    output = Path(output)
    check_not_a_file(output)
    if existing_outputs(output, RUN_FILES):
        raise OutputError(f"{output} is the folder of one training run, not of a sweep: choose another --output")
    if threads:
        torch.set_num_threads(threads)
    _merged_plan(output, specs)  # refuses a foreign sweep.json before anything is written
    for spec in specs:  # every saved run must have this sweep's settings: checked before anything is written
        if spec.options["dataset"] != "synthetic" and spec.options["data_dir"] is None:
            raise ValueError(f"run {spec.name}: dataset {spec.options['dataset']} needs data_dir (or --data-dir)")
        _check_saved_run(output / spec.name, spec, device)
    plan_written = False

    def write_plan_once():  # after the checks and the first dataset: a sweep refused before writes nothing
        nonlocal plan_written
        if not plan_written:
            check_writable(output)
            _write_plan(output, specs)
            plan_written = True

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
            except FolderBusy as error:  # another sweep (--only) is training it: leave it to that one
                log(f"{head}: skipped, {error}")
                summaries.append({"name": spec.name, "status": "busy"})
                continue
        tta = write_tta(folder, splits, model_config, config.eval_batch_size, device)
        log(f"{head}: test accuracy {tta['test_accuracy']:.4f}, with H-flip TTA {tta['test_accuracy_hflip_tta']:.4f} "
            f"({time.perf_counter() - run_started:.0f} s; sweep {time.perf_counter() - started:.0f} s)")
        summaries.append({"name": spec.name, "status": "trained", **tta})
    return summaries


def read_sweep_plan(path) -> List[dict]:
    """The runs of a ``sweep.json`` (each a mapping with a ``name``); :class:`RunFileError` (one line
    naming the file and the field) when it is not a gpconv sweep plan."""
    runs = read_json_object(path, {"runs": ((list,), "a list of runs", True)})["runs"]
    for index, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            raise RunFileError(f"{path}: runs[{index}] is not a run with a name")
    return runs


def _check_saved_run(folder: Path, spec: RunSpec, device: str) -> None:
    """Refuse (one line) a run folder whose saved settings differ from ``spec``'s: a finished run
    (``metrics.json``: its ``config.json``) or an interrupted one (``last.pt``)."""
    from .checkpoint import RESUME_KEYS, load_checkpoint, resume_differences

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


def _merged_plan(output: Path, specs: Sequence[RunSpec], busy: Sequence[str] = ()) -> List[dict]:
    """The runs ``sweep.json`` will list: an earlier ``sweep.json``'s in their order, each run that ``specs``
    name replaced in place (a sweep run with ``--only`` keeps the others) unless it is ``busy`` (being
    trained by another process, with the settings it listed), then ``specs``' new runs. Refused when
    ``sweep.json`` is not gpconv's."""
    path = output / "sweep.json"
    try:
        earlier = read_sweep_plan(path) if path.exists() else []
    except RunFileError as error:
        raise OutputError(f"{error}: it is not a gpconv sweep plan; choose another --output") from None
    ours = {s.name: {"name": s.name, "arch": s.arch, "variant": s.variant, "options": s.options} for s in specs}
    listed = {r["name"] for r in earlier}
    kept = [r if r["name"] in busy else ours.pop(r["name"], r) for r in earlier]
    return kept + [run for name, run in ours.items() if name not in listed]


def _write_plan(output: Path, specs: Sequence[RunSpec]) -> None:
    """Merge ``specs`` into ``sweep.json`` (:func:`_merged_plan`) and write it, holding a lock file beside it
    (``.sweep.json.lock``): sweeps of one folder run at once (``--only``, one run each) read, merge and write
    in turn, so none loses the runs another added since it started."""
    with folder_lock(output, ".sweep.json.lock"):
        busy = [s.name for s in specs if folder_locked(output / s.name, RUN_LOCK)]
        atomic_write_text(output / "sweep.json", json.dumps({"runs": _merged_plan(output, specs, busy)}, indent=2))
