"""biofed.datasets"""
