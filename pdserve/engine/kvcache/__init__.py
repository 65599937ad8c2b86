"""Paged KV cache: pool tensor, block allocator with prefix cache, prefix keys."""
