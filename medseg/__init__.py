"""medseg: train, run and evaluate segmentation models on CT and MR scans, keeping each scan's geometry."""

__version__ = "0.1.0"
