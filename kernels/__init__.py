"""biofed.kernels"""
