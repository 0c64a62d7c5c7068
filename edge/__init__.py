"""biofed.edge: what runs on a device.

- :mod:`biofed.edge.pipeline`: sensor chunks -> aligned windows -> feature rows (optionally
  projected onto the k=32 basis), with a mergeable sketch for fitting a local basis.
- :mod:`biofed.edge.store`: durable, capped SQLite store of feature rows, and the device's
  own records beside them (ingestion ledger, feature layout, privacy ledgers).
- :mod:`biofed.edge.ingestion`: recordings and live rows into the store, on a device clock.
- :mod:`biofed.edge.tasks`: the answers to federated tasks, pure functions of (task, local data).
- :mod:`biofed.edge.prediction`: on-device predictions with the current global model.
- :mod:`biofed.edge.agent`: the device agent, a loop over MQTT around the modules above.
- :mod:`biofed.edge.replay_cli`: ``biofed replay``, recordings streamed through the pipeline.
"""

from biofed.edge.pipeline import (
    Basis,
    ChunkError,
    FeatureLayout,
    FeatureRow,
    PipelineConfig,
    PipelineError,
    StreamingPipeline,
    extract_features,
    fit_basis,
)
from biofed.edge.store import FeatureStore, StoreError

__all__ = [
    "Basis",
    "ChunkError",
    "FeatureLayout",
    "FeatureRow",
    "FeatureStore",
    "PipelineConfig",
    "PipelineError",
    "StoreError",
    "StreamingPipeline",
    "extract_features",
    "fit_basis",
]
