"""biofed.kernels"""

from biofed.kernels.biosensor import BIOSENSOR_FEATURES, detect_peaks, heart_rate_features, window_statistics
from biofed.kernels.spectral import EEG_BANDS, SPECTRAL_BACKEND, band_powers, log_band_energies
from biofed.kernels.windowing import count_windows, sliding_windows
