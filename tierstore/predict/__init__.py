"""Prediction: eviction policies, the predictor, batch replay, shadow caches (statistics in, decisions out)."""
