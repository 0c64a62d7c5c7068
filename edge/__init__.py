"""biofed.edge: what runs on a device.

- :mod:`biofed.edge.pipeline`: sensor chunks -> aligned windows -> feature rows (optionally
  projected onto the k=32 basis of :mod:`biofed.model`).
- :mod:`biofed.edge.store`: durable, capped SQLite store of feature rows, and the device's
  own records beside them (ingestion ledger, feature layout, privacy ledgers).
- :mod:`biofed.edge.ingestion`: recordings and live rows into the store, on a device clock.
- :mod:`biofed.edge.tasks`: the answers to federated tasks, pure functions of (task, local data).
- :mod:`biofed.edge.prediction`: on-device predictions with the current global model.
- :mod:`biofed.edge.agent`: the device agent, a loop over MQTT around the modules above.
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
