"""biofed: privacy-preserving federated learning on edge biosensor devices."""

__version__ = "0.1.0"
