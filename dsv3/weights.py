"""The old name of dsv3.checkpoint.read, for the one import left (dsv3/model.py's); use dsv3.checkpoint."""

from dsv3.checkpoint.read import WeightLoader  # noqa: F401
