import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAPER_NUMBERS = SHARED / "reference" / "paper_numbers.json"


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


@pytest.fixture
def paper_numbers_path():
    if not PAPER_NUMBERS.exists():
        pytest.skip("../shared/reference/paper_numbers.json is not present")
    return PAPER_NUMBERS


# Before any test module imports timm, torchvision or transformers (which imports torchvision when present).
from _torchvision_compat import make_torchvision_importable  # noqa: E402

TORCHVISION = make_torchvision_importable()
