"""The serving plumbing between an HTTP server and the synchronous engine: the async
engine (per-request streams over an engine loop) and the engine process."""
