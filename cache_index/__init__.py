"""Block hashing, the radix index of which worker holds which KV blocks, and SGLang KV-event decoding.

Pure and synchronous: no I/O, no asyncio, so every piece is property-tested and benchmarked alone.
"""
