"""Autograd Functions and torch.library custom ops (with fake implementations)."""
