"""Shrinking a trained model: per-layer conversion, the fit to the dense layers, the budget, gpconv shrink."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import gpconv
from conftest import ROOT, gpconv_cli, with_batch_norm_statistics
from gpconv.core.convert import apply_conversion, conversion_record
from gpconv.core.fit import (LayerStatistics, choose_channels_per_group, collect_layer_statistics, fit_block,
                             fit_to_dense, recompute_batch_norm)


class Dense(nn.Module):
    """Stem, a 1x1 conv followed by batch norm, a 1x1 conv with bias, a linear head (all dense)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 64, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.project = nn.Conv2d(64, 48, 1, stride=2)
        self.head = nn.Linear(48, 40)

    def forward(self, x):
        x = torch.relu(self.bn(self.expand(torch.relu(self.stem(x)))))
        return self.head(self.project(x).mean((2, 3)))


def _batches(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return with_batch_norm_statistics(Dense(), _batches(4, 1))


def _inputs(model, name, batches):
    """The inputs the layer called ``name`` receives on ``batches``."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


def _output_error(block_like, dense_layer, x):
    with torch.no_grad():
        want, got = dense_layer(x), block_like(x)
    return ((got - want).pow(2).sum() / want.pow(2).sum()).item()


@pytest.mark.parametrize("version,l_layer", [(2, True), (1, True), (2, False), (1, False)])
def test_the_fit_lowers_every_block_error_on_held_out_inputs(dense, version, l_layer):
    converted = gpconv.convert(dense, 8, version=version, l_layer=l_layer, linear=True)
    held_out = _batches(3, 99)
    names = ("expand", "project", "head")
    before = {name: _output_error(converted.get_submodule(name), dense.get_submodule(name), _inputs(dense, name, held_out))
              for name in names}
    fits = fit_to_dense(dense, converted, _batches(12, 2), steps=30)
    assert {fit.name for fit in fits} == set(names)  # Conv2d and Linear blocks
    for name in names:
        after = _output_error(converted.get_submodule(name), dense.get_submodule(name), _inputs(dense, name, held_out))
        assert after < 0.5 * before[name], (name, before[name], after)
    assert "fit error" in str(gpconv.summarize(converted))


def _exact_dense(in_channels, out_channels, channels_per_group, version, l_layer, seed):
    """A dense 1x1 convolution whose weights are a block's own (so the block's plan represents it): K
    alone drawn from N(0, 1); with L, PyTorch's default initialisation (K + LK with a large random L
    is a non-convex fit whose closed-form start can settle in another minimum, measured: 0.4-0.5%)."""
    torch.manual_seed(seed)
    source = gpconv.GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version,
                                           l_layer=l_layer, batch_norm=False, bias=True)
    with torch.no_grad():
        for parameter in source.parameters() if source.l is None else ():
            parameter.normal_()
        weight, bias = source.dense_equivalent()
        layer = nn.Conv2d(in_channels, out_channels, 1)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _statistics(channels, seed, samples=3000):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, channels, generator=generator) + torch.randn(channels, generator=generator)
    x = torch.cat([x, torch.ones(samples, 1)], 1).double()
    return LayerStatistics(x.T @ x / samples, samples, 1)


@pytest.mark.parametrize("shape,version,l_layer,steps", [((64, 128, 16), 1, False, 0), ((64, 96, 16), 2, False, 0),
                                                         ((48, 96, 8), 2, True, 0), ((40, 120, 8), 2, True, 300),
                                                         ((96, 64, 8), 1, True, 300)])
def test_a_dense_layer_a_block_can_represent_is_recovered_to_float_precision(shape, version, l_layer, steps):
    layer = _exact_dense(*shape, version, l_layer, seed=3)
    block = gpconv.GroupedPointwiseConv2d(*shape, version=version, l_layer=l_layer, batch_norm=False, bias=True)
    # without the default ridge, which trades exactness on the calibration data for robustness on new data
    before, after = fit_block(block, layer, _statistics(shape[0], 4), steps=steps, ridge=1e-9)
    assert before > 0.5 and after < 1e-6
    x = torch.randn(5, shape[0], 3, 3)
    assert torch.allclose(block(x), layer(x), rtol=1e-3, atol=1e-3 * layer(x).abs().max().item())


def test_a_batch_norm_after_a_layer_is_found_and_weights_its_outputs(dense):
    stats = collect_layer_statistics(dense, _batches(2, 5), ["expand", "project", "head"])
    assert stats["expand"].output_scale is not None and stats["expand"].output_scale.shape == (64,)
    assert stats["project"].output_scale is None and stats["head"].output_scale is None
    assert stats["project"].positions == 25 and stats["expand"].samples == 2 * 8 * 100
    with pytest.raises(ValueError, match="no layer named"):
        collect_layer_statistics(dense, _batches(1, 5), ["nope"])


def test_batch_norm_statistics_are_recomputed_from_the_calibration_data(dense):
    model = gpconv.convert(dense, 8)
    model.bn.running_mean.fill_(5.0)
    model.train()
    batches = _batches(3, 6)
    assert recompute_batch_norm(model, batches) == 3
    assert model.training and model.bn.momentum == dense.bn.momentum
    inputs = torch.cat([model.expand(torch.relu(model.stem(b))) for b in batches]).detach()
    assert torch.allclose(model.bn.running_mean, inputs.mean((0, 2, 3)), atol=1e-5)


def test_a_per_layer_mapping_and_the_conversion_record_rebuild_the_model(dense):
    converted = gpconv.convert(dense, {"expand": 4, "project": None, "head": 8}, linear=True)
    assert converted.expand.plan.channels_per_group == 4 and converted.head.plan.channels_per_group == 8
    assert isinstance(converted.project, nn.Conv2d)
    assert "dense in the per-layer mapping" in str(gpconv.summarize(converted))
    record = conversion_record(converted)
    assert record["channels_per_group"] == {"expand": 4, "head": 8}
    rebuilt = apply_conversion(Dense(), json.loads(json.dumps(record)))
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(rebuilt.eval()(x), converted.eval()(x))
    with pytest.raises(ValueError, match="not 1x1 convolutions"):
        gpconv.convert(dense, {"expnad": 4})
    with pytest.raises(ValueError, match="not a gpconv conversion record"):
        apply_conversion(Dense(), {"channels_per_group": {}})


def test_the_budget_is_respected_and_spent_where_the_fit_error_says(dense):
    model = Dense()
    model.load_state_dict(dense.state_dict())
    # "expand" becomes exactly representable with 4 channels per group; "project" stays a random matrix
    exact = _exact_dense(32, 64, 4, 2, True, seed=7)
    model.expand.weight.data.copy_(exact.weight)
    model.eval()
    calibration = _batches(6, 8)
    total = sum(p.numel() for p in model.parameters())
    for budget in (0.5, 0.65, 0.85):
        choice = choose_channels_per_group(model, calibration, budget, steps=20)
        assert choice.parameters <= int(budget * total) == choice.budget_parameters
        converted = gpconv.convert(model, choice.mapping)
        assert sum(p.numel() for p in converted.parameters()) == choice.parameters
    assert choice.errors["expand"][4] < 0.05 < choice.errors["project"][4]
    assert choice.mapping["expand"] in (4, 8) and choice.mapping["project"] != 4
    with pytest.raises(ValueError, match="below the smallest"):
        choose_channels_per_group(model, calibration, 0.05, steps=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        choose_channels_per_group(model, calibration, 1.5)


# a dense teacher: MobileNet (half width: quick fits) at 16x16 on 200 + 100 synthetic images
TEACHER = ["--arch", "mobilenet", "--width", "0.5", "--image-size", "16", "--skip-strides", "2", "--dataset", "synthetic",
           "--synthetic-size", "200,100", "--batch-size", "8", "--max-train-batches", "2", "--threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    dense_run = folder / "dense"
    result = gpconv_cli("train", *TEACHER, "--epochs", "1", "--output", str(dense_run))
    assert result.returncode == 0, result.stderr
    k_run = folder / "k16"
    result = gpconv_cli("train", *TEACHER, "--epochs", "1", "--channels-per-group", "16", "--output", str(k_run))
    assert result.returncode == 0, result.stderr
    return dense_run / "best.pt", k_run / "best.pt"


def assert_evaluate_agrees(output, tmp_path):
    """``gpconv evaluate`` of the run's best.pt gives the test accuracy its metrics.json recorded."""
    metrics = json.loads((output / "metrics.json").read_text())
    evaluated = gpconv_cli("evaluate", "--checkpoint", str(output / "best.pt"), "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "e.json").read_text())["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def quick_shrink(checkpoint, output, *options):
    """``gpconv shrink`` on 64 calibration images, one thread; the finished process."""
    result = gpconv_cli("shrink", "--checkpoint", str(checkpoint), *options, "--calibration-images", "64", "--threads",
                        "1", "--output", str(output))
    assert result.returncode == 0, result.stderr
    return result


def test_gpconv_shrink_writes_a_run_folder_that_evaluate_loads(teacher, tmp_path):
    dense_checkpoint, _ = teacher
    output = tmp_path / "shrunk"
    result = quick_shrink(dense_checkpoint, output, "--channels-per-group", "16", "--epochs", "1", "--fit-steps", "5")
    metrics = json.loads((output / "metrics.json").read_text())
    config = json.loads((output / "config.json").read_text())
    fit = json.loads((output / "fit.json").read_text())
    assert config["train"]["teacher"] == str(dense_checkpoint) and config["train"]["schedule"] == "cosine"
    assert config["train"]["shrink"]["channels_per_group"] == 16 and config["train"]["seed"] == 0
    # the fine-tuning defaults (docs/results.md): AdamW, whose state last.pt keeps, and no augmentation
    assert config["train"]["optimizer"] == "adamw" and config["train"]["augment"] is False
    assert config["train"]["lr"] == 3e-3  # one channels per group: its measured rate (a budget's: 1e-3, below)
    last = torch.load(output / "last.pt", weights_only=True)
    assert all("exp_avg" in state for state in last["optimizer"]["state"].values())
    assert config["model"]["conversion"]["format"] == "gpconv-conversion/1"
    errors = [(layer["initial_error"], layer["relative_error"]) for layer in fit["layers"]]
    assert errors and sum(after for _, after in errors) < 0.5 * sum(before for before, _ in errors), errors
    assert config["train"]["shrink"]["block_steps"] == 100  # block reconstruction is on by default
    assert fit["blocks"] and all(b["relative_error"] <= b["initial_error"] for b in fit["blocks"])
    assert metrics["trainable_params"] == fit["trainable_params"] < fit["teacher_params"]
    assert "start (epoch 0): val_loss" in result.stdout and metrics["best_epoch"] in (0, 1)  # the start competes
    assert_evaluate_agrees(output, tmp_path)
    summary = gpconv_cli("summary", "--checkpoint", str(output / "best.pt"))
    assert summary.returncode == 0, summary.stderr
    assert "fit error" in summary.stdout and f"{metrics['trainable_params']:,}" in summary.stdout
    again = gpconv_cli("shrink", "--checkpoint", str(dense_checkpoint), "--channels-per-group", "16", "--epochs", "1",
                       "--output", str(output))
    assert again.returncode == 2 and "already holds" in again.stderr  # the output rule, as gpconv train


def test_gpconv_shrink_with_no_fine_tuning_tests_the_fitted_model(teacher, tmp_path, monkeypatch):
    dense_checkpoint, _ = teacher
    output = tmp_path / "fitted"
    quick_shrink(dense_checkpoint, output, "--budget", "0.5", "--epochs", "0", "--fit-steps", "0")
    fit = json.loads((output / "fit.json").read_text())
    assert fit["trainable_params"] <= 0.5 * fit["teacher_params"] and fit["budget"]["mapping"]
    assert_evaluate_agrees(output, tmp_path)
    # fine-tuning that fitted model later: no conversion or fit again, its weights are the start
    import gpconv.experiments.shrink as shrink_module
    from gpconv.experiments.checkpoint import CheckpointError
    from gpconv.experiments.config import ShrinkConfig

    started = {}
    monkeypatch.setattr(shrink_module, "fit_to_dense", lambda *a, **k: pytest.fail("fitted again"))
    monkeypatch.setattr(shrink_module, "train", lambda config, model_config, **k: started.update(k, config=config))
    tuned = tmp_path / "tuned"
    shrink_module.shrink(ShrinkConfig(str(dense_checkpoint), str(tuned), budget=0.5, epochs=1, fit_steps=0,
                                      calibration_images=64, start_from=str(output), optimizer="rmsprop",
                                      augment=True), log=lambda line: None)
    assert (started["config"].optimizer, started["config"].augment) == ("rmsprop", True)  # the first protocol
    assert started["config"].lr == 1e-3  # a budget's measured rate
    fitted = torch.load(output / "best.pt", weights_only=True)["model"]
    assert started["initial_state"].keys() == fitted.keys()
    assert all(torch.equal(started["initial_state"][key], fitted[key]) for key in fitted)
    tuned_fit = json.loads((tuned / "fit.json").read_text())
    assert tuned_fit["start_from"] == str(output) and tuned_fit["budget"] == fit["budget"]
    assert started["config"].shrink["start_from"] == str(output)
    other = gpconv_cli("shrink", "--checkpoint", str(dense_checkpoint), "--budget", "0.4", "--epochs", "1",
                       "--start-from", str(output), "--output", str(tmp_path / "other"))
    assert other.returncode != 0 and "other settings (budget, " in other.stderr and other.stderr.count("\n") == 1
    assert not (tmp_path / "other").exists()
    # a run from before block reconstruction (no block_steps recorded) did none: it is a start for --block-steps 0
    saved = torch.load(output / "best.pt", weights_only=True)
    del saved["train_config"]["shrink"]["block_steps"]
    torch.save(saved, output / "best.pt")
    for block_steps, accepted in ((0, True), (100, False)):
        options = dict(budget=0.5, epochs=1, fit_steps=0, calibration_images=64, start_from=str(output))
        config = ShrinkConfig(str(dense_checkpoint), str(tmp_path / f"legacy{block_steps}"), block_steps=block_steps,
                              **options)
        if accepted:
            shrink_module.shrink(config, log=lambda line: None)
        else:
            with pytest.raises(CheckpointError, match=r"other settings \(block_steps\)"):
                shrink_module.shrink(config, log=lambda line: None)


@pytest.mark.parametrize("case", ["missing", "budget0", "budget2", "grouped", "both", "no-dataset", "start-not-shrink"])
def test_gpconv_shrink_bad_input_is_one_line_and_writes_nothing(teacher, tmp_path, case):
    dense_checkpoint, grouped_checkpoint = teacher
    checkpoint, size = str(dense_checkpoint), ["--channels-per-group", "16"]
    if case == "missing":
        checkpoint = str(tmp_path / "nope.pt")
    elif case == "budget0":
        size = ["--budget", "0"]
    elif case == "budget2":
        size = ["--budget", "1.5"]
    elif case == "grouped":
        checkpoint = str(grouped_checkpoint)
    elif case == "both":
        size = ["--budget", "0.5", "--channels-per-group", "16"]
    elif case == "no-dataset":
        saved = torch.load(dense_checkpoint, weights_only=True)
        saved["train_config"]["dataset"] = None
        checkpoint = str(tmp_path / "no-dataset.pt")
        torch.save(saved, checkpoint)
    elif case == "start-not-shrink":  # a k-model trained from scratch is no earlier shrink to start from
        size += ["--start-from", str(grouped_checkpoint.parent)]
    before = sorted(p.name for p in tmp_path.iterdir())
    # the first case as a real process too: one line on stderr and no traceback, warnings included
    result = gpconv_cli("shrink", "--checkpoint", checkpoint, *size, "--epochs", "1", "--output", str(tmp_path / "out"),
                        process=case == "missing")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_third_party_model_and_a_dataloader_shrink_through_the_python_api():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 64, 96, 128],
                                       depths=[1, 1, 1, 1])
    dense = transformers.ResNetForImageClassification(config).eval()
    images = torch.randn(48, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(48).long()), batch_size=16)
    converted, fits = gpconv.convert_and_fit(dense, loader, 8, exclude=["classifier"], steps=10)
    assert fits and all(fit.relative_error < fit.initial_error for fit in fits)
    with torch.no_grad():
        assert converted.eval()(images[:4]).logits.shape == (4, 10)
    total = sum(p.numel() for p in dense.parameters())
    budgeted, _ = gpconv.convert_and_fit(dense, loader, budget=0.5, exclude=["classifier"], steps=5)
    assert sum(p.numel() for p in budgeted.parameters()) <= 0.5 * total
    with pytest.raises(ValueError, match="exactly one"):
        gpconv.convert_and_fit(dense, loader)


def test_the_sequential_fit_fits_each_block_on_the_converted_models_own_inputs(dense):
    converted = gpconv.convert(dense, 8, linear=True)
    fits = fit_to_dense(dense, converted, _batches(12, 2), steps=10, sequential=True)
    assert [fit.name for fit in fits] == ["expand", "project", "head"]  # in the order they run
    assert all(fit.relative_error < fit.initial_error for fit in fits)
    held_out = _batches(3, 99)
    with torch.no_grad():
        want = torch.cat([dense(b) for b in held_out])
        got = torch.cat([converted.eval()(b) for b in held_out])
        random = torch.cat([gpconv.convert(dense, 8, linear=True).eval()(b) for b in held_out])
    assert (got - want).pow(2).sum() < (random - want).pow(2).sum()


@settings(max_examples=30, deadline=None)
@given(inputs=st.integers(3, 12), outputs=st.integers(1, 6), entries=st.integers(1, 40), seed=st.integers(0, 999))
def test_the_batched_row_solve_equals_solving_row_by_row(inputs, outputs, entries, seed):
    from gpconv.core.block_fit import _fit_rows, _ridge

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, outputs, (entries,), generator=generator)
    columns = torch.randint(0, inputs, (entries,), generator=generator)  # repeated (row, column) pairs too
    features = torch.randn(50, inputs, generator=generator, dtype=torch.float64)
    gram, rhs = features.T @ features, torch.randn(inputs, outputs, generator=generator, dtype=torch.float64)
    want = torch.zeros(entries, dtype=torch.float64)
    seen = set()
    for row in range(outputs):  # the straightforward form: one system per row on its first-seen columns
        where = [i for i in range(entries) if rows[i] == row and (row, int(columns[i])) not in seen
                 and not seen.add((row, int(columns[i])))]
        if where:
            cols = columns[where]
            want[where] = torch.linalg.solve((gram + _ridge(gram, 0.01))[cols][:, cols], rhs[cols, row])
    assert torch.allclose(_fit_rows(gram, rows, columns, rhs, 0.01), want, atol=1e-10)


def test_gpconv_shrink_killed_before_its_first_epoch_ended_resumes_by_starting_again(teacher, tmp_path):
    """A shrink stopped during its first epoch leaves fit.json and config.json but no last.pt: --resume
    fits and fine-tunes again instead of refusing (the same rule as train --resume and sweep)."""
    dense_checkpoint, _ = teacher
    output = tmp_path / "stopped"
    output.mkdir()
    (output / "fit.json").write_text("{}")
    (output / "config.json").write_text("{}")
    saved = torch.load(dense_checkpoint, weights_only=True)
    torch.save({**saved, "epoch": 0}, output / "best.pt")  # the fitted start, saved as epoch 0 before epoch 1
    quick_shrink(dense_checkpoint, output, "--channels-per-group", "16", "--epochs", "1", "--fit-steps", "2",
                 "--resume")
    assert json.loads((output / "metrics.json").read_text())["epochs"] == 1
    assert json.loads((output / "fit.json").read_text())["layers"]


def test_gpconv_shrink_into_a_folder_another_process_is_training_writes_nothing(teacher, tmp_path):
    """shrink holds the run folder's lock from its first write (fit.json) through the fine-tuning; while
    another process holds it, shrink is one line and the folder keeps its files."""
    import fcntl

    from gpconv.experiments.run_folder import RUN_LOCK

    dense_checkpoint, _ = teacher
    output = tmp_path / "busy"
    output.mkdir()
    (output / "config.json").write_text("{}")
    with open(output / RUN_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = {p.name: p.read_bytes() for p in output.iterdir()}
        for epochs in ("0", "1"):
            result = gpconv_cli("shrink", "--checkpoint", str(dense_checkpoint), "--channels-per-group", "16",
                                "--epochs", epochs, "--fit-steps", "2", "--calibration-images", "64", "--overwrite",
                                "--output", str(output))
            assert result.returncode == 2 and "being trained by another" in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "fitting" not in result.stdout  # before the fit
            assert {p.name: p.read_bytes() for p in output.iterdir()} == before
