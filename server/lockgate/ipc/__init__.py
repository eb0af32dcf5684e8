"""The hop between front-end processes and the engine process.

``slab``: shared-memory segments and the ring allocator that hands out their
bytes. ``messages``: the compact control messages (msgspec, msgpack) that
describe tensors living in those slabs. Nothing here knows about gRPC or
ONNX Runtime.
"""
