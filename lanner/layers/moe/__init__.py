"""Mixture-of-experts layers: router, stacked experts, executor strategies, dispatch."""
