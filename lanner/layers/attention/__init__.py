from lanner.layers.attention.backend import AttentionBackend, Attention, forward_context

__all__ = ["Attention", "AttentionBackend", "forward_context"]
