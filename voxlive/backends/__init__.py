"""Compute backends: one runtime each, mirroring each other file for file."""
