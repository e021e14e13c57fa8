"""gemma_assets: clustering vs sparse autoencoders on a language model's residual stream.

Warnings the project understands and accepts are silenced here, once, for every entry point
(CLI, `dagster dev`, notebooks); the test suite installs the same list (conftest.py). Nowhere
else sets a warning filter.
"""

import warnings

# (message regex, where it comes from): the regex is matched at the start of the warning's message
ACCEPTED_WARNINGS = (
    # stores written before the Blosc codec used numcodecs' whole-chunk Shuffle, not (yet) in the
    # zarr v3 spec; zarr-python reads them fine
    ("Numcodecs codecs are not in the Zarr version 3", "zarr"),
    # Dagster features used on purpose while it labels them beta or preview: single-run backfills
    # (one model load for many partitions), pools, and per-partition asset checks
    (".* is currently in (beta|preview)", "dagster"),
)

for message, _ in ACCEPTED_WARNINGS:
    warnings.filterwarnings("ignore", message=message)
