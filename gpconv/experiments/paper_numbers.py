"""The authors' published figures (``paper_numbers.json``) and the variant names they use.

A variant name reads like the papers' rows: ``baseline``, ``v2-16ch``, ``v1-32ch``,
``v2-16ch-noL`` (no L layer), ``v2-16ch-relu`` (ReLU instead of the family's activation).

Some rows were run with builder options a variant name does not carry (the DenseNet notebooks);
:func:`reference_options` adds them from :data:`NOTEBOOK_OPTIONS`, which cites each notebook.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..core.plan import PLAN_VERSIONS

__all__ = ["Variant", "ReferenceRow", "load_reference", "parse_variant", "reference_options", "NOTEBOOK_OPTIONS",
           "VERSION_PATTERN"]

# the ``v<version>`` of variant names: one of the plan versions
VERSION_PATTERN = "|".join(str(version) for version in PLAN_VERSIONS)
_VARIANT = re.compile(rf"^v(?P<version>{VERSION_PATTERN})-(?P<cpg>\d+)ch(?P<flags>(-(noL|relu))*)$")


@dataclass(frozen=True)
class Variant:
    """Model options for one row of the papers' tables."""

    name: str
    channels_per_group: Optional[int] = None
    version: int = 2
    l_layer: bool = True
    activation: Optional[str] = None  # None: the family's reference default

    def model_options(self) -> dict:
        return dict(channels_per_group=self.channels_per_group, version=self.version, l_layer=self.l_layer,
                    activation=self.activation)


def parse_variant(name: str) -> Variant:
    """``"baseline"`` or ``"v{1,2}-{N}ch[-noL][-relu]"`` -> :class:`Variant`."""
    if name == "baseline":
        return Variant(name)
    match = _VARIANT.match(name)
    if match is None:
        raise ValueError(f"unknown variant {name!r}; expected 'baseline' or e.g. 'v2-16ch', 'v1-32ch-noL', "
                         "'v2-8ch-relu'")
    flags = match.group("flags")
    return Variant(name, int(match.group("cpg")), int(match.group("version")), "-noL" not in flags,
                   "relu" if "-relu" in flags else None)


# (arch, variant) -> builder options the authors' notebooks passed beyond the variant name.
NOTEBOOK_OPTIONS: Dict[Tuple[str, str], dict] = {
    # JP33B15: ksimple_densenet(kTypeBlock=kType, kTypeTransition=kType, activation=relu), kTypes 23, 25.
    ("densenet_bc_100", "v1-32ch-noL"): dict(activation="relu"),
    ("densenet_bc_100", "v1-64ch-noL"): dict(activation="relu"),
    # JP33B25: ksimple_densenet(..., activation=swish, has_interleave_at_transition=True), D6_12ch/D6_24ch.
    ("densenet_bc_100", "v1-12ch"): dict(activation="swish", transition_interleave=True),
    ("densenet_bc_100", "v1-24ch"): dict(activation="swish", transition_interleave=True),
}


def reference_options(arch: str, variant: str) -> dict:
    """``create_model`` keywords that rebuild the authors' model for one row: the variant name's
    options plus any notebook-only options (:data:`NOTEBOOK_OPTIONS`)."""
    options = parse_variant(variant).model_options()
    options.update(NOTEBOOK_OPTIONS.get((arch, variant), {}))
    return options


@dataclass(frozen=True)
class ReferenceRow:
    arch: str
    variant: str
    num_classes: int
    input_size: int
    trainable_params: int
    computations: int
    source: str = ""


def load_reference(path: Union[str, Path, None] = None) -> List[ReferenceRow]:
    """Rows of ``paper_numbers.json`` (the copy shipped with gpconv unless ``path`` is given)."""
    if path is None:
        text = resources.files("gpconv").joinpath("experiments/paper_numbers.json").read_text()
    else:
        text = Path(path).read_text()
    fields = ReferenceRow.__dataclass_fields__
    return [ReferenceRow(**{k: v for k, v in row.items() if k in fields}) for row in json.loads(text)["rows"]]
