"""Paged KV-cache bookkeeping: which block holds which tokens of which request.

The tensors live in the model runner; this module only hands out block ids.
A block is in exactly one of three states:
  used    ref_count > 0, listed in some requests' `block_ids`;
  cached  ref_count == 0 but its content hash is registered, so a later request
          with the same prefix can take it back; it is also free and is
          evicted (least recently freed first) when fresh blocks run out;
  free    ref_count == 0 and no hash.
Prefix caching keys each full block by a hash chain over the tokens up to its
end, so a block matches only if every earlier token matches too.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from lanner.core.request import Request


@dataclass
class KVCacheStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int  # includes cached ones: they can be evicted at any time
    cached_blocks: int  # free blocks whose content can still be hit
    prefix_queries: int  # prompt tokens looked up
    prefix_hits: int  # of those, tokens found in the cache

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        # 1 with an EAGLE or MTP head: the draft's KV at a block's last position depends on the
        # token after the block, which a later request may not share; recomputing the last hit
        # block rewrites it (the block before is covered by the hash chain)
        self.hit_blocks_recomputed = 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cached_free = 0  # free blocks with a hash (stats() are sampled while serving: no walk of the list)
        self.prefix_queries = 0
        self.prefix_hits = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_blocks(self, req: Request) -> list[int]:
        """Blocks that already hold a prefix of `req`'s tokens. At least one
        token is left to compute, since its logits are needed to sample."""
        if not self._may_hit(req):
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._hash_full_blocks(req, max_blocks)
        hits = []
        for block_hash in req.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits[:max(len(hits) - self.hit_blocks_recomputed, 0)]

    def hash_prompt(self, req: Request) -> None:
        """Hash the blocks `find_cached_blocks` will look up, on arrival rather than in the step that
        admits the request (with overlap scheduling, arrivals are handled while the GPU runs)."""
        if self._may_hit(req):
            self._hash_full_blocks(req, (req.num_tokens - 1) // self.block_size)

    def _may_hit(self, req: Request) -> bool:
        # with prompt logprobs (or routing) every prompt position is computed (and scored)
        return self.enable_prefix_caching and req.params.prompt_logprobs is None \
            and not req.params.return_prompt_routed_experts

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] | None = None,
                 lookahead: int = 0) -> bool:
        """Give `req` the blocks for `num_new_tokens` more tokens after its computed
        ones, and `lookahead` positions after those (a drafter writes them; they are never
        offered to the prefix cache). On admission, `cached_blocks` (from
        `find_cached_blocks`, possibly empty) are adopted first. False, changing nothing,
        if blocks run short."""
        if cached_blocks is None and self._nothing_to_do(req, req.num_computed_tokens + num_new_tokens, lookahead):
            return True
        adopted = cached_blocks or []
        num_computed = req.num_computed_tokens + len(adopted) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens + lookahead)
        num_fresh = total - len(req.block_ids) - len(adopted)
        num_revived = sum(1 for b in adopted if self.ref_counts[b] == 0)
        if num_fresh + num_revived > len(self.free):
            return False
        if cached_blocks is not None:
            self.prefix_queries += req.num_tokens
            self.prefix_hits += num_computed
        for block_id in adopted:
            if self.ref_counts[block_id] == 0:
                del self.free[block_id]
                self.num_cached_free -= 1
            self.ref_counts[block_id] += 1
        req.block_ids.extend(adopted)
        req.num_computed_tokens = num_computed
        req.block_ids += self._take_free_blocks(num_fresh)
        self._register_full_blocks(req, (num_computed + num_new_tokens) // self.block_size)
        return True

    def _nothing_to_do(self, req: Request, end: int, lookahead: int) -> bool:
        """A running request's blocks already hold its positions up to `end` + `lookahead`, and no
        block it fills by `end` is new to the prefix cache: most decode steps (a few microseconds
        a request of every step's host time otherwise)."""
        return self.blocks_needed(end + lookahead) <= len(req.block_ids) and \
            (not self.enable_prefix_caching or end // self.block_size <= req.num_registered_blocks)

    def free_request(self, req: Request) -> None:
        # Tail blocks are freed first so they are evicted before the shared prefix.
        for block_id in reversed(req.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free[block_id] = None
                self.num_cached_free += self.block_hash[block_id] is not None
        req.block_ids = []
        req.num_registered_blocks = 0

    def slot(self, req: Request, position: int) -> int:
        return req.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def stats(self) -> KVCacheStats:
        free = len(self.free)
        return KVCacheStats(self.num_blocks, self.num_blocks - free, free, self.num_cached_free,
                            self.prefix_queries, self.prefix_hits)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (after the weights change, say) and the hit counts.
        Refused (False, nothing changed) while requests hold blocks, whose content would
        otherwise stay findable; vLLM refuses likewise."""
        if len(self.free) < self.num_blocks:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        self.num_cached_free = 0
        self.prefix_queries = self.prefix_hits = 0
        return True

    def check_invariants(self, live: list[Request]) -> None:
        """Assert the bookkeeping is consistent with the live requests (for tests)."""
        refs = [0] * self.num_blocks
        for req in live:
            for block_id in req.block_ids:
                refs[block_id] += 1
        assert refs == self.ref_counts, "ref counts differ from the live requests' block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if refs[b] == 0}, "free list is wrong"
        assert self.num_cached_free == sum(self.block_hash[b] is not None for b in self.free), "cached count is wrong"
        for block_hash, block_id in self.cached.items():
            assert self.block_hash[block_id] == block_hash, "hash index points at a block with other content"

    def _take_free_blocks(self, n: int) -> list[int]:
        """`n` free blocks (least recently freed first), each with one reference; a cached one's
        content is evicted. (Locals, not attributes, in the loops: a long prompt takes hundreds.)"""
        pop, block_hash, ref_counts = self.free.popitem, self.block_hash, self.ref_counts
        taken = [pop(last=False)[0] for _ in range(n)]
        for block_id in taken:
            ref_counts[block_id] = 1
            if block_hash[block_id] is not None:  # evict its cached content
                del self.cached[block_hash[block_id]]
                block_hash[block_id] = None
                self.num_cached_free -= 1
        return taken

    def _hash_full_blocks(self, req: Request, num_full: int) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), num_full):
            parent = req.block_hashes[i - 1] if i else b""
            tokens = req.all_token_ids[i * bs:(i + 1) * bs]
            digest = hashlib.sha256(parent + struct.pack(f"<{len(tokens)}I", *tokens))
            req.block_hashes.append(digest.digest())

    def _register_full_blocks(self, req: Request, num_full: int) -> None:
        """Make the blocks that will be full after this step findable by later requests.
        Their KV is written in this step's forward, before any later step reads it."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_full, len(req.all_token_ids) // self.block_size)  # a pending token's id is unknown
        self._hash_full_blocks(req, num_full)
        hashes, cached, first = self.block_hash, self.cached, req.num_registered_blocks
        for block_id, block_hash in zip(req.block_ids[first:num_full], req.block_hashes[first:num_full]):
            if hashes[block_id] is None and block_hash not in cached:
                hashes[block_id] = block_hash
                cached[block_hash] = block_id
        req.num_registered_blocks = max(req.num_registered_blocks, num_full)
