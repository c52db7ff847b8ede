"""The control flow shared by every backend: fit -> task -> epoch -> step, eval after each task."""
