"""Callbacks that come with clrun: progress display, console summary."""
