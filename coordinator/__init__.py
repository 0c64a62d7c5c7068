"""biofed.coordinator"""
