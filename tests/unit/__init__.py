"""Tests that need no server: contracts, data, models, export, the layers."""
