"""Defenses: scans of the training data (detectors) and, later, of models, and repairs (DESIGN: Defenses)."""
