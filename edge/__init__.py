"""biofed.edge"""
