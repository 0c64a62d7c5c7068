"""biofed.kernels"""

from biofed.kernels.biosensor import BIOSENSOR_FEATURES, detect_peaks, heart_rate_features, window_statistics
from biofed.kernels.random_state import check_random_state
from biofed.kernels.spectral import (
    EEG_BANDS,
    FLOAT32_RTOL,
    SPECTRAL_BACKEND,
    SpectralPlan,
    band_power_plan,
    band_powers,
    log_band_energies,
    log_band_energy_plan,
    reduce_segments,
    segment_powers,
    spectral_features,
)
from biofed.kernels.stats import (
    SCALE_FLOOR_REL,
    Moments,
    moments_init,
    moments_merge,
    moments_scale,
    moments_update,
    standard_scale,
)
from biofed.kernels.svd import fd_basis, fd_init, fd_merge, fd_update, project, svd_compress, truncated_svd
from biofed.kernels.training import clip_l2, dp_sgd, init_params, loss_and_grad, n_params, predict_proba, train
from biofed.kernels.transform import TransformPlan, apply_transform, transform, transform_matrix, transform_plan
from biofed.kernels.windowing import count_windows, sliding_windows

__all__ = [
    "BIOSENSOR_FEATURES",
    "EEG_BANDS",
    "FLOAT32_RTOL",
    "Moments",
    "SCALE_FLOOR_REL",
    "SPECTRAL_BACKEND",
    "SpectralPlan",
    "TransformPlan",
    "apply_transform",
    "band_power_plan",
    "band_powers",
    "check_random_state",
    "clip_l2",
    "count_windows",
    "detect_peaks",
    "dp_sgd",
    "fd_basis",
    "fd_init",
    "fd_merge",
    "fd_update",
    "heart_rate_features",
    "init_params",
    "log_band_energies",
    "log_band_energy_plan",
    "loss_and_grad",
    "moments_init",
    "moments_merge",
    "moments_scale",
    "moments_update",
    "n_params",
    "predict_proba",
    "project",
    "reduce_segments",
    "segment_powers",
    "sliding_windows",
    "spectral_features",
    "standard_scale",
    "svd_compress",
    "train",
    "transform",
    "transform_matrix",
    "transform_plan",
    "truncated_svd",
    "window_statistics",
]
