"""Experiments run through the project's own trainer (`python -m experiments.NAME`)."""
