"""The LightningModules (:class:`LatentOptimization`, :class:`RewardFineTuning`), their shared
base and what LatentOptimization optimizes (its targets).

Imports every layer below it; only the CLI imports it.
"""
