"""Exactness against the authors' figures in ../shared/reference/paper_numbers.json."""

import json

import pytest

import gpconv
from gpconv.experiments.paper_numbers import load_reference, parse_variant
from gpconv.experiments.paper_tables import papers_input_setting

from conftest import PAPER_NUMBERS, paper_rows, assert_matches_paper

EFFICIENTNET_B0 = paper_rows("efficientnet_b0")


def build(row):
    options = parse_variant(row["variant"]).model_options()
    skip = papers_input_setting(row["arch"], row["input_size"])
    return gpconv.create_model(row["arch"], row["num_classes"], skip_strides=skip, **options)


def row_id(row):
    return f"{row['arch']}-{row['variant']}-{row['num_classes']}cls-{row['input_size']}px"


def test_reference_rows_present():
    if not PAPER_NUMBERS.exists():
        pytest.skip("../shared/reference/paper_numbers.json is not present")
    assert len(EFFICIENTNET_B0) >= 40


@pytest.mark.parametrize("row", EFFICIENTNET_B0, ids=row_id)
def test_efficientnet_b0_row(row):
    assert_matches_paper(build(row), row)


def test_packaged_copy_matches_shared_file(paper_numbers_path):
    """The demo reads the copy shipped in the package; it must be the shared file verbatim."""
    shipped = [row.__dict__ for row in load_reference()]
    shared = [row.__dict__ for row in load_reference(paper_numbers_path)]
    assert shipped == shared
    assert json.loads(paper_numbers_path.read_text())["rows"][0]["trainable_params"] == shipped[0]["trainable_params"]
