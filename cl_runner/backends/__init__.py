"""Backends: the same learners, written once per deep-learning library."""
