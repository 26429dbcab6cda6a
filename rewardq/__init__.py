"""rewardq: queue-based batch scoring and retraining for reward models.

The one import package of the project: ``client`` (the producer's Python client and CLI, the base install),
``api`` (the HTTP server), ``workers`` (Celery, the engine, models, trainer), ``storage`` (SQLAlchemy and
migrations) and ``kernels`` (Triton kernels). Importing ``rewardq`` imports none of them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rewardq")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0.0.0+local"
