"""Offline side of ctr-serve: FeatureSpec, readers, synthetic data, networks and training.

Importing this package (and `model.spec`, `model.readers`, `model.synth`) must not import
torch, because the serving image ships the spec code without it.
"""
