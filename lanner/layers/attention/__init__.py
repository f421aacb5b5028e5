from lanner.layers.attention.backend import Attention, AttentionBackend, forward_context

__all__ = ["Attention", "AttentionBackend", "forward_context"]
