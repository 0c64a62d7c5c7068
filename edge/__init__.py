"""biofed.edge: what runs on a device.

- :mod:`biofed.edge.pipeline`: sensor chunks -> aligned windows -> feature rows (optionally
  projected onto the k=32 basis of :mod:`biofed.model`).
- :mod:`biofed.edge.store`: durable, capped SQLite store of feature rows.
- :mod:`biofed.edge.replay_cli`: ``biofed replay``, recordings streamed through the pipeline.
"""

from biofed.edge.pipeline import (
    ChunkError,
    FeatureRow,
    PipelineConfig,
    PipelineError,
    StreamingPipeline,
    extract_features,
)
from biofed.edge.store import FeatureStore, StoreError

__all__ = [
    "ChunkError",
    "FeatureRow",
    "FeatureStore",
    "PipelineConfig",
    "PipelineError",
    "StoreError",
    "StreamingPipeline",
    "extract_features",
]
