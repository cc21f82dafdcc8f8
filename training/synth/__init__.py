"""Synthetic battery CT slices and RGB photos, written in the AI Hub 71687 layout."""
