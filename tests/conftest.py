import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores, so the
# workers' torch and OpenMP threads do not oversubscribe the machine (set before any test imports torch; the
# processes tests start inherit it). A thread count given by the caller is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAPER_NUMBERS = SHARED / "reference" / "paper_numbers.json"


def gpconv_cli(*argv, process=False):
    """``gpconv ARGV`` as a finished process (``returncode``, ``stdout``, ``stderr``): run in this process by
    ``gpconv.cli.main`` with its output captured (no interpreter and torch start-up per command), or with
    ``process`` as a real one (what a user's shell sees: warnings and tracebacks on stderr too)."""
    import torch

    from gpconv.cli import main

    argv = [str(arg) for arg in argv]
    if process:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "gpconv.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                              env=environment, timeout=600)
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def with_batch_norm_statistics(model, batches):
    """``model`` after a forward pass in train mode on each batch (its batch norms hold statistics of their own,
    as a trained model's), in eval mode."""
    import torch

    with torch.no_grad():
        model.train()
        for batch in batches:
            model(batch)
    return model.eval()


def paper_rows(arch=None):
    """Rows of ../shared/reference/paper_numbers.json (the authors' figures); [] when absent."""
    if not PAPER_NUMBERS.exists():
        return []
    rows = json.loads(PAPER_NUMBERS.read_text())["rows"]
    return [row for row in rows if arch is None or row["arch"] == arch]


def assert_matches_paper(model, row):
    """Trainable parameters exact; computations within 1% (the acceptance) and, as we reach it, exact."""
    import gpconv

    assert gpconv.count_parameters(model) == row["trainable_params"]
    computations = gpconv.count_computations(model, row["input_size"])
    assert abs(computations - row["computations"]) <= 0.01 * row["computations"]
    assert computations == row["computations"]


def groupable_layers(model, classifier, linear, channels_per_group):
    """Name -> (in, out, bias) of the layers ``gpconv.convert(model, channels_per_group,
    exclude=[classifier], linear=linear)`` should group, found on the dense model."""
    import gpconv
    from gpconv.core.convert import is_plain_linear, is_plain_pointwise

    found = {}
    for name, module in model.named_modules():
        if name == classifier or name.startswith(classifier + "."):
            continue
        if is_plain_pointwise(module):
            shape = (module.in_channels, module.out_channels)
        elif linear and is_plain_linear(module):
            shape = (module.in_features, module.out_features)
        else:
            continue
        if gpconv.make_plan(*shape, channels_per_group).grouped:
            found[name] = shape + (module.bias is not None,)
    return found


def predicted_parameter_drop(layers, channels_per_group):
    """Trainable parameters removed by grouping ``layers`` (``groupable_layers``'s values), by the plans."""
    import gpconv

    return sum(cin * cout + (cout if bias else 0)
               - gpconv.make_plan(cin, cout, channels_per_group).parameter_count(batch_norm=False, bias=bias)
               for cin, cout, bias in layers)


@pytest.fixture
def paper_numbers_path():
    if not PAPER_NUMBERS.exists():
        pytest.skip("../shared/reference/paper_numbers.json is not present")
    return PAPER_NUMBERS


# Before any test module imports timm, torchvision or transformers (which imports torchvision when present).
from _torchvision_compat import make_torchvision_importable  # noqa: E402

TORCHVISION = make_torchvision_importable()
