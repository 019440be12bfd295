"""Kernels, launchers and autograd functions; no nn.Module code lives here."""
