"""The papers' image datasets by name, at their former path: the code is in
:mod:`gpconv.experiments.data.paper` (cache, memory map, split, loading) and
:mod:`gpconv.experiments.data.paper_sources` (sources, listings, download)."""

from .data.paper import MappedImages, load_paper_dataset, prepare_cache, stratified_split
from .data.paper_sources import PLANTDOC_COMMIT, SOURCES, Archive, Entry, PaperSource

__all__ = ["Archive", "PaperSource", "SOURCES", "Entry", "MappedImages", "prepare_cache", "stratified_split",
           "load_paper_dataset", "PLANTDOC_COMMIT"]
