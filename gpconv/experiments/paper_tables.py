"""Paper-style tables: parameters and computations of model variants, next to the published figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ..core.counting import count_computations, count_parameters
from ..io import render_table
from ..models import check_input_size, check_width, create_model
from .paper_numbers import ReferenceRow, load_reference, reference_options

__all__ = ["VariantFigures", "measure_variant", "paper_table", "format_table", "papers_input_setting"]


def papers_input_setting(arch: str, input_size: int) -> int:
    """``skip_strides`` the papers used at ``input_size``: EfficientNet at 32x32 skips the stem and
    the first two strided stages (the reference's ``skip_stride_cnt=3``)."""
    return 3 if arch.startswith("efficientnet") and input_size == 32 else 0


@dataclass(frozen=True)
class VariantFigures:
    variant: str
    trainable_params: int
    computations: int
    reference: Optional[ReferenceRow] = None
    width: float = 1.0


def measure_variant(arch: str, variant: str, num_classes: int = 10, input_size: int = 224,
                    reference: Sequence[ReferenceRow] = (), width: float = 1.0) -> VariantFigures:
    """Build ``arch`` in the given variant (at the width multiplier ``width``: ``create_model``'s
    ``width``) and count it; attach the matching published row, if any (the papers' rows are width 1)."""
    options = reference_options(arch, variant)
    if check_width(width) != 1.0:
        options["width"] = width
    check_input_size(arch, input_size, papers_input_setting(arch, input_size))
    with torch.device("meta"):  # counting needs shapes only; same counts, ~10x faster than on the CPU
        model = create_model(arch, num_classes, skip_strides=papers_input_setting(arch, input_size), **options)
    match = next((row for row in reference if width == 1.0 and (row.arch, row.variant, row.num_classes, row.input_size)
                  == (arch, variant, num_classes, input_size)), None)
    return VariantFigures(variant, count_parameters(model), count_computations(model, input_size), match, width)


def paper_table(arch: str, variants: Iterable[str], num_classes: int = 10, input_size: int = 224,
                reference: Optional[Sequence[ReferenceRow]] = None,
                widths: Sequence[float] = (1.0,)) -> List[VariantFigures]:
    """Figures for ``variants`` at each width multiplier of ``widths`` (the first row, ``baseline`` at
    the first width, is the 100% row)."""
    reference = load_reference() if reference is None else reference
    return [measure_variant(arch, name, num_classes, input_size, reference, width) for width in widths
            for name in variants]


def _mark(ours: int, theirs: Optional[int]) -> str:
    if theirs is None:
        return "-"
    return "ok" if ours == theirs else f"{100.0 * (ours - theirs) / theirs:+.2f}%"


def format_table(rows: Sequence[VariantFigures], markdown: bool = False) -> str:
    """Variant, parameters, % of baseline, computations, %, and the published figures with a match
    mark per cell ("ok" when identical, otherwise the relative difference); plain text, or Markdown
    when ``markdown`` (:func:`gpconv.io.render_table`)."""
    base = rows[0]
    header = ("variant", "parameters", "%", "computations", "%", "paper parameters", "", "paper computations", "")
    body: List[Tuple[str, ...]] = []
    for row in rows:
        ref = row.reference
        body.append((
            row.variant + ("" if row.width == 1.0 else f" (width {row.width:g})"), f"{row.trainable_params:,}", f"{100.0 * row.trainable_params / base.trainable_params:.1f}%",
            f"{row.computations:,}", f"{100.0 * row.computations / base.computations:.1f}%",
            f"{ref.trainable_params:,}" if ref else "-", _mark(row.trainable_params, ref and ref.trainable_params),
            f"{ref.computations:,}" if ref else "-", _mark(row.computations, ref and ref.computations),
        ))
    return render_table(header, body, markdown=markdown)
