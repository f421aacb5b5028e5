"""Proposers of speculative drafts, one method per file (n-gram lookup so far)."""
