"""Measurements of memory and time (activation profiles of training steps)."""
