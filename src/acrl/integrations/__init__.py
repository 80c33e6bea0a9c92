"""Bridges from AC-RL to other training stacks.

``acrl.integrations.trl``: AC-RL's tiered reward as a reward function for TRL's ``GRPOTrainer`` (needs ``trl``,
installed with the ``trl`` extra).
"""
