"""The batch jobs behind the CLI, under the names earlier versions exported from this module.

The code lives where the data flow puts it; import from there in new code:

* :mod:`cdretrieval.loading` — :func:`load_model`, :class:`LoadedModel`, :func:`load_run_index` (shared with
  serving);
* :mod:`cdretrieval.domain_embeddings` — :func:`embed_domains` (``cdretrieval embed``);
* :mod:`cdretrieval.indexing` — :func:`build_indexes`, :func:`add_to_index` (``cdretrieval index``);
* :mod:`cdretrieval.evaluation` — :func:`evaluate` (``cdretrieval evaluate``).

Importing this module imports all of them (training excepted); serving imports only
:mod:`cdretrieval.loading`.
"""

from __future__ import annotations

from cdretrieval.data.folders import collect_images
from cdretrieval.domain_embeddings import EmbeddedDomain, embed_domains, embeddings_folder
from cdretrieval.evaluation import evaluate
from cdretrieval.indexing import DEFAULT_DETECTOR_FEATURE, AddedImages, add_to_index, build_indexes
from cdretrieval.loading import FEATURES, LoadedModel, check_image_size, load_model, load_run_index
from cdretrieval.run import EMBEDDINGS_DIR

__all__ = [
    "DEFAULT_DETECTOR_FEATURE",
    "EMBEDDINGS_DIR",
    "FEATURES",
    "AddedImages",
    "EmbeddedDomain",
    "LoadedModel",
    "add_to_index",
    "build_indexes",
    "check_image_size",
    "collect_images",
    "embed_domains",
    "embeddings_folder",
    "evaluate",
    "load_model",
    "load_run_index",
]
