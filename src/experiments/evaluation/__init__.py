"""Evaluation: a split scored by a trained model, its reports and figures, and calibration."""
