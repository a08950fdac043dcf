"""Ovis-U1: a compact, faithful, trainable implementation of the unified understanding/generation model."""
