"""acrl: Adaptive-Clarification RL."""
__version__ = "0.1.0"
