"""Verification of speculative drafts: how many draft tokens the target accepts, and the token
that follows them, such that the output follows the target's distribution exactly.

The target scores k+1 positions per request in one forward: after the context, and after each
of the k draft tokens. Two rules, both exact:

- Greedy drafts (no draft probabilities: n-gram lookup, and draft models or heads that propose
  their argmax, as lanner's proposers do). The draft is a point mass q(d) = 1, for which the
  standard acceptance probability min(1, p(d) / q(d)) is p(d), and the residual max(p - q, 0)
  is p without d. The target's own sample at each position, drawn as it would be without
  speculation (the same processed probabilities and the same noise, keyed by the request's seed
  and the token's output index), realises exactly that: accept while the draft equals it, and
  the first sample that differs is the recovered token. So the output is, token for token, what
  decoding without speculation gives, greedy or seeded, whatever the batch.
- Drafts with probabilities q (a sampled draft): accept d with probability min(1, p(d) / q(d))
  using a uniform keyed apart from the sampling noise; at the first rejection sample the
  normalised residual max(p - q, 0); when all k are accepted sample the bonus token from p
  (Leviathan et al., 2023; Chen et al., 2023).

Everything stays on the device: no host sync between verification and the next draft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lanner.kernels.sampling_reference import race_noise_ref, race_sample_ref


@dataclass
class Verified:
    tokens: torch.Tensor  # [B, k+1]: the accepted drafts, then the recovered or bonus token
    num_accepted: torch.Tensor  # [B]: drafts accepted; a request emits num_accepted + 1 tokens


def accepted_prefix(matches: torch.Tensor) -> torch.Tensor:
    """[B, k] booleans -> [B]: how many leading positions are True."""
    return matches.long().cumprod(dim=1).sum(dim=1)


def verify_greedy_drafts(draft_tokens: torch.Tensor, target_tokens: torch.Tensor) -> Verified:
    """draft_tokens [B, k]; target_tokens [B, k+1]: the target's own sample at each position.
    The output is the target's samples up to and including the first one that differs from its
    draft (all k+1 when every draft matches)."""
    k = draft_tokens.shape[1]
    return Verified(target_tokens, accepted_prefix(draft_tokens == target_tokens[:, :k]))


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row of keys [N, 2], from the same counter-based hash as the
    sampling noise (so CPU and GPU runs agree)."""
    return torch.exp(-race_noise_ref(keys, 1)[:, 0])


def _sample(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if probs.is_cuda:
        from lanner.kernels.sampling import race_sample  # Triton: the GPU path only

        return race_sample(probs, keys)
    return race_sample_ref(probs, keys)


def verify_sampled_drafts(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                          accept_keys: torch.Tensor, sample_keys: torch.Tensor) -> Verified:
    """Standard rejection sampling. draft_tokens [B, k]; draft_probs [B, k, V] (the distribution
    each draft token was sampled from); target_probs [B, k+1, V] (after temperature, top-k,
    top-p, min-p); accept_keys [B, k, 2] and sample_keys [B, k+1, 2]: counter-based keys of the
    acceptance uniforms and of the token draws, independent of each other."""
    B, k = draft_tokens.shape
    V = target_probs.shape[-1]
    p_draft = target_probs[:, :k].gather(2, draft_tokens[..., None])[..., 0]
    q_draft = draft_probs.gather(2, draft_tokens[..., None])[..., 0]
    u = uniform(accept_keys.reshape(B * k, 2)).reshape(B, k)
    # accept when u * q(d) <= p(d): u < min(1, p/q) without dividing by a zero q
    num_accepted = accepted_prefix(u * q_draft <= p_draft)
    # at every position, the token drawn if that position is the first rejected one (the
    # residual) or the bonus position (p itself); only the one at num_accepted is kept
    residual = (target_probs[:, :k] - draft_probs).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # a residual without mass only happens where p == q, which accepts with probability 1
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target_probs[:, :k])
    fallback = torch.cat([residual, target_probs[:, k:]], dim=1)
    drawn = _sample(fallback.reshape(B * (k + 1), V), sample_keys.reshape(B * (k + 1), 2)).reshape(B, k + 1)
    positions = torch.arange(k + 1, device=draft_tokens.device)[None, :]
    padded_drafts = torch.cat([draft_tokens, draft_tokens.new_zeros(B, 1)], dim=1)
    tokens = torch.where(positions < num_accepted[:, None], padded_drafts, drawn)
    return Verified(tokens, num_accepted)
