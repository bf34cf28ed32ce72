"""Speculative decoding with the checkpoint's MTP module (vLLM's `--speculative-config`).

Each step, after the target model's tokens are appended, the MTP module runs over the positions the step
computed (the target's final-norm hidden state at each and the token after it), writing its own paged
latent cache through the sequences' block tables, and proposes k draft tokens per decoding sequence from
its output at the last position: the first from that pass, the others by applying the one module again to
its own output and draft (as vLLM does for k > 1). Where the backend records steps, greedy drafts replay a recording
of all of it (dsv3.serving.draft_recording). The next step verifies them: the scheduler runs each
sequence's last token and its drafts as one chunk of 1 + k query tokens (the paged MLA prefill path, or
the chunk-row recording of its bucket), and the rejection sampler keeps a prefix of the drafts plus one
token of the target's own:
- greedy rows keep the drafts that equal the target's argmax, then the target's token;
- sampled rows keep draft d with probability min(1, p(d) / q(d)) and, at the first rejection, draw from
  the normalised max(0, p - q), or, all kept, the target's next token from p; so every token has the
  target's distribution exactly (p: the target's processed distribution, q: the one d was drawn from).
The cache slots of rejected drafts are overwritten later; their blocks go back at once (Scheduler.accepted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from dsv3.backends.interface import PagedBatch
from dsv3.config import ModelConfig
from dsv3.errors import UsageError
from dsv3.model import ForwardBatch, Transformer
from dsv3.serving.draft_recording import DraftRecordings
from dsv3.serving.request import Sequence
from dsv3.serving.sampler import Sampler, apply_penalties, truncate

#: `method` values: dsv3's name and vLLM's
METHODS = ("mtp", "deepseek_mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings (vLLM's --speculative-config JSON).

    Attributes:
        method: "mtp" or vLLM's "deepseek_mtp": the checkpoint's multi-token-prediction module drafts.
        num_speculative_tokens: draft tokens per step (k >= 1; k > 1 applies the one module recurrently).
        disable_by_batch_size: no drafts while more sequences than this run (None: always draft).
    """

    method: str = "mtp"
    num_speculative_tokens: int = 1
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, value, flag: str = "--speculative-config") -> "SpeculativeConfig | None":
        """From a JSON string, a dict or a SpeculativeConfig (None stays None); UsageError naming the field."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UsageError(f"{flag}: not JSON ({e.msg} at character {e.pos}): {value!r}") from None
        if not isinstance(value, dict):
            raise UsageError(f"{flag} must be a JSON object such as "
                             f'{{"method": "mtp", "num_speculative_tokens": 1}}, got {value!r}')
        unknown = sorted(set(value) - {"method", "num_speculative_tokens", "disable_by_batch_size"})
        if unknown:
            raise UsageError(f"{flag}: unknown field {unknown[0]!r} (known: method, num_speculative_tokens, "
                             f"disable_by_batch_size)")
        method = value.get("method", "mtp")
        if method not in METHODS:
            raise UsageError(f"{flag}: method {method!r} is not supported (supported: {', '.join(METHODS)})")
        k = value.get("num_speculative_tokens", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"{flag}: num_speculative_tokens must be an integer >= 1, got {k!r}")
        limit = value.get("disable_by_batch_size")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"{flag}: disable_by_batch_size must be an integer >= 1, got {limit!r}")
        return cls(method, k, limit)

    def check_model(self, config: ModelConfig, source: str = "the model") -> None:
        """UsageError where the checkpoint has no MTP layer to draft with."""
        if not config.num_nextn_predict_layers:
            raise UsageError(f"--speculative-config method {self.method!r}: {source} has no MTP layer "
                             f"(num_nextn_predict_layers is 0)")


@dataclass
class SpecDecodeStats:
    """Counters since the start, as vLLM names them: drafts verified (one per sequence and step), draft
    tokens proposed, of which accepted, and accepted at each draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens each verify step gave a sequence on average (accepted drafts plus the target's own)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def copy(self) -> "SpecDecodeStats":
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_pos))


class _Row:
    """What the sampler's penalties read of a sequence at one verified position: its tokens with the
    drafts before that position taken as accepted."""

    def __init__(self, seq: Sequence, drafts: list[int]):
        self.params, self.generator = seq.params, seq.generator
        self.token_ids, self.num_prompt_tokens = seq.token_ids + drafts, seq.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class Verified:
    """A verified sequence's new tokens (accepted drafts, then the target's), their logprobs, and how
    many drafts were accepted."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]
    num_accepted: int


def _needs_processing(params) -> bool:
    return (params.temperature != 0 or params.logprobs is not None or params.repetition_penalty != 1
            or bool(params.presence_penalty) or bool(params.frequency_penalty))


def rejection_sample(logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler) -> list[Verified]:
    """Verify each sequence's drafts against the target's logits.

    Args:
        logits: float32 [R, V]: per sequence in order, 1 + len(draft_token_ids) rows, the target's logits
            at its last token and at each draft.
        seqs: the sequences, each with its draft tokens (and draft_probs where it samples).
        sampler: for the shared generator of unseeded requests and the logprobs.
    """
    counts = [1 + len(s.draft_token_ids) for s in seqs]
    if not any(_needs_processing(s.params) for s in seqs):  # greedy without penalties: one argmax
        targets = logits.argmax(dim=-1).tolist()
        out, row = [], 0
        for seq, count in zip(seqs, counts, strict=True):
            accepted = _matching(seq.draft_token_ids, targets[row:row + count])
            out.append(Verified(targets[row:row + accepted + 1], [None] * (accepted + 1), accepted))
            row += count
        return out
    rows = [_Row(seq, seq.draft_token_ids[:j]) for seq in seqs for j in range(1 + len(seq.draft_token_ids))]
    params = [r.params for r in rows]
    logits = logits.float()
    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits, rows)
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    scaled = logits / temperature[:, None]
    targets = scaled.argmax(dim=-1).tolist()
    probs = truncate(scaled, params).softmax(dim=-1) if any(p.temperature != 0 for p in params) else None
    out, row = [], 0
    for seq, count in zip(seqs, counts, strict=True):
        drafts = seq.draft_token_ids
        if seq.params.temperature == 0:
            accepted = _matching(drafts, targets[row:row + count])
            tokens = targets[row:row + accepted + 1]
        else:
            tokens = _speculative_sample(probs[row:row + count], seq, sampler)
            accepted = len(tokens) - 1
        logprobs = [None] * len(tokens)
        if seq.params.logprobs is not None:
            emitted = torch.tensor(tokens, device=logits.device)
            logprobs = sampler._logprobs(scaled[row:row + len(tokens)], emitted, params[row:row + len(tokens)])
        out.append(Verified(tokens, logprobs, accepted))
        row += count
    return out


def _matching(drafts: list[int], targets: list[int]) -> int:
    """How many drafts at the front equal the target's tokens."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


def _speculative_sample(p: torch.Tensor, seq: Sequence, sampler: Sampler) -> list[int]:
    """The tokens a sampled sequence keeps: p [1 + d, V] the target's distributions at its positions."""
    drafts, q = seq.draft_token_ids, seq.draft_probs
    generator = seq.generator if seq.generator is not None else sampler.generator
    d = len(drafts)
    if d:
        index = torch.tensor(drafts, device=p.device)[:, None]
        p_draft = p[:d].gather(1, index)[:, 0]
        q_draft = q.gather(1, index)[:, 0]
        uniform = torch.rand(d, generator=generator, device=p.device)
        keep = (uniform * q_draft < p_draft).tolist()  # u < p/q, without dividing by q
    for j in range(d):
        if not keep[j]:
            residual = (p[j] - q[j]).clamp(min=0)
            total = residual.sum()
            residual = residual / total if total > 0 else p[j]  # p == q: a rejection cannot happen
            return drafts[:j] + [_draw(residual, generator)]
    return drafts + [_draw(p[d], generator)]


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `probs` [V] (the exponential race, as the sampler draws)."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / race).argmax())


class MTPProposer:
    """Drafts tokens with the model's MTP module, which keeps its own paged latent cache.

    Its pool has the engine's blocks (the same block tables address it) and, past them, a few spare
    blocks per batch row: the recurrent drafts write there where they run past a sequence's blocks, so
    no block is held for a token that is not accepted.

    Args:
        model: the model, its MTP module loaded and its cache allocated (the MTP pool takes its type).
        config: the speculative settings.
        num_blocks, block_size: the engine's pool.
        max_num_seqs: sequences running at once at most.
        max_model_len: the longest sequence.
        sampler: the engine's sampler (the shared generator of unseeded requests).
        rows_as_decode: run several positions of a sequence as decode rows that attend to the rows before
            them (PagedBatch.shared_rows: absorbed attention over the cached context, as the engine's recorded
            chunk rows do; for backends that record steps), else as prefill chunks.
        buckets: with rows_as_decode, record the draft step per pair of these row counts (the model runner's
            buckets; dsv3.serving.draft_recording), and run greedy drafts by replaying it.
    """

    def __init__(self, model: Transformer, config: SpeculativeConfig, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_model_len: int, sampler: Sampler, rows_as_decode: bool = False,
                 buckets: tuple[int, ...] = ()):
        self.model, self.config, self.sampler = model, config, sampler
        self.rows_as_decode = rows_as_decode
        self.module = model.mtp[0]
        self.k = config.num_speculative_tokens
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.spares_per_row = -(-self.k // block_size) + 1
        spec = model.cache_spec_for(num_blocks + max_num_seqs * self.spares_per_row, block_size)
        self.cache = model.backend.allocate_mla_cache(spec)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.k)
        self.recordings = None
        if rows_as_decode and buckets:
            self.recordings = DraftRecordings(model, self.module, self.cache, self.k, buckets,
                                              -(-max_model_len // block_size) + self.spares_per_row,
                                              max_model_len + self.k)

    def enabled(self, num_running: int) -> bool:
        limit = self.config.disable_by_batch_size
        return limit is None or num_running <= limit

    def record(self, verified: Verified, num_drafts: int) -> None:
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += verified.num_accepted
        for j in range(verified.num_accepted):
            s.accepted_per_pos[j] += 1

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[Sequence, list[int], list]]:
        """(seq, new tokens, their logprobs) per sequence: the sampler's token for those without drafts,
        the rejection sampler's for those verifying drafts (logits: one row, or 1 + k rows, each)."""
        plain = [i for i, s in enumerate(seqs) if not s.draft_token_ids]
        verify = [i for i, s in enumerate(seqs) if s.draft_token_ids]
        starts, row = [], 0
        for seq in seqs:
            starts.append(row)
            row += 1 + len(seq.draft_token_ids)
        out: list = [None] * len(seqs)
        if plain:
            got = self.sampler(logits[torch.tensor([starts[i] for i in plain], device=logits.device)],
                               [seqs[i] for i in plain])
            for j, i in enumerate(plain):
                out[i] = (seqs[i], [got.tokens[j]], [got.logprobs[j]])
        rows = [r for i in verify for r in range(starts[i], starts[i] + 1 + len(seqs[i].draft_token_ids))]
        verified = rejection_sample(logits[torch.tensor(rows, device=logits.device)], [seqs[i] for i in verify],
                                    self.sampler)
        for i, v in zip(verify, verified, strict=True):
            out[i] = (seqs[i], v.tokens, v.logprobs)
            self.record(v, len(seqs[i].draft_token_ids))
        return out

    @torch.inference_mode()
    def propose(self, spans: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor, draft: bool) -> None:
        """Run the module over the positions a step computed and draft for the sequences now decoding.

        Args:
            spans: (sequence, first row in `hidden`, first position, number of positions) of each
                unfinished sequence the step ran: the positions whose cache the step wrote and whose next
                token is known.
            hidden: the step's final-norm hidden states [rows, D].
            draft: propose tokens (False: only fill the module's cache, speculation being off).
        """
        spans = [s for s in spans if s[3] > 0]
        if not spans:
            return
        spans.sort(key=lambda s: s[3] != 1)  # single positions first: they run as decode rows
        rows, tokens, positions = [], [], []
        for seq, row, start, count in spans:
            rows += range(row, row + count)
            tokens += seq.token_ids[start + 1:start + count + 1]
            positions += range(start, start + count)
        drafting = self._drafting(spans) if draft else []
        recorded = self.recordings is not None and self.recordings.enabled
        if recorded and self._replay(spans, hidden, rows, tokens, positions, drafting):
            return
        if self.rows_as_decode:
            decodes = [(seq.block_table, p + 1, 1) for seq, _, start, count in spans
                       for p in range(start, start + count)]
            chunks = []
        else:
            decodes = [(seq.block_table, start + 1, 1) for seq, _, start, count in spans if count == 1]
            chunks = [(seq.block_table, start + count, count) for seq, _, start, count in spans if count > 1]
        device = hidden.device
        out = self._run(hidden[torch.tensor(rows, device=device)], tokens, positions, decodes, chunks,
                        shared_rows=self.rows_as_decode and len(decodes) > len(spans))
        if not drafting:
            return
        h = out[torch.tensor([row for row, _, _ in drafting], device=device)]
        seqs = [seq for _, seq, _ in drafting]
        for seq in seqs:
            seq.drop_drafts()
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))  # rows of `h` still drafting
        for step in range(self.k):
            new = self._choose(self.module.project(h), [seqs[i] for i in live])
            for j, i in enumerate(live):
                token, p = new[j]
                seqs[i].draft_token_ids.append(token)
                if p is not None:
                    probs[i].append(p)
            keep = [j for j, i in enumerate(live) if drafting[i][2] > step + 1]
            if not keep:
                break
            live = [live[j] for j in keep]
            h = h[torch.tensor(keep, device=device)]
            position = [seqs[i].num_tokens - 1 + step for i in live]  # the newest draft's, minus one
            tables = [self._table_with_spares(seqs[i].block_table, slot, p + 1)
                      for slot, (i, p) in enumerate(zip(live, position, strict=True))]
            h = self._run(h, [seqs[i].draft_token_ids[-1] for i in live], position,
                          [(t, p + 1, 1) for t, p in zip(tables, position, strict=True)], [])
        for seq, p in zip(seqs, probs, strict=True):
            seq.draft_probs = torch.stack(p) if p else None

    def _drafting(self, spans: list[tuple[Sequence, int, int, int]]) -> list[tuple[int, Sequence, int]]:
        """(last row of its span, sequence, draft count) of each sequence that drafts after this step: those
        now decoding, as many as max_tokens and max_model_len leave room for."""
        ends, end = [], -1
        for _, _, _, count in spans:
            end += count
            ends.append(end)
        drafting = [(i, seq, min(self.k, seq.max_tokens - seq.num_output_tokens - 1,
                                 self.max_model_len - seq.num_tokens))
                    for i, (seq, _, _, _) in enumerate(spans) if seq.num_computed_tokens == seq.num_tokens - 1]
        return [(ends[i], seq, n) for i, seq, n in drafting if n > 0]

    def _replay(self, spans, hidden: torch.Tensor, rows: list[int], tokens: list[int], positions: list[int],
                drafting: list[tuple[int, Sequence, int]]) -> bool:
        """The cache fill and greedy drafts by replaying a recording; False where it cannot (a sampled draft,
        rows past the largest bucket, a backend that declines), the caller then runs them eagerly."""
        if any(seq.params.temperature != 0 for _, seq, _ in drafting):
            return False
        tables = [seq.block_table for seq, _, start, count in spans for _ in range(count)]
        steps = [[None if step + 1 >= n else
                  (seq.num_tokens - 1 + step, self._table_with_spares(seq.block_table, slot, seq.num_tokens + step))
                  for step in range(self.k - 1)] for slot, (_, seq, n) in enumerate(drafting)]
        drafts = self.recordings.run(hidden, rows, tokens, positions, tables, [end for end, _, _ in drafting], steps)
        if drafts is None:
            return False
        for (_, seq, n), tokens_of_seq in zip(drafting, drafts, strict=True):
            seq.drop_drafts()
            seq.draft_token_ids += tokens_of_seq[:n]
        return True

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, torch.Tensor | None]]:
        """A draft per row: the argmax for greedy sequences; else drawn from the module's distribution
        under the sequence's temperature and truncation, returned with it."""
        params = [s.params for s in seqs]
        if all(p.temperature == 0 for p in params):
            return [(t, None) for t in logits.argmax(dim=-1).tolist()]
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        q = truncate(logits / temperature[:, None], params).softmax(dim=-1)
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, seq in enumerate(seqs):
            if params[i].temperature == 0:
                out.append((greedy[i], None))
            else:
                generator = seq.generator if seq.generator is not None else self.sampler.generator
                out.append((_draw(q[i], generator), q[i]))
        return out

    def _table_with_spares(self, table: list[int], slot: int, num_tokens: int) -> list[int]:
        needed = -(-num_tokens // self.block_size) - len(table)
        first = self.num_blocks + slot * self.spares_per_row
        return table + list(range(first, first + max(needed, 0)))

    def _run(self, hidden: torch.Tensor, tokens: list[int], positions: list[int],
             decodes: list[tuple[list[int], int, int]], chunks: list[tuple[list[int], int, int]],
             shared_rows: bool = False) -> torch.Tensor:
        """The module over rows: decodes (table, seq_len, 1) first, then chunks (table, seq_len, count)."""
        device = hidden.device
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)
        batch = ForwardBatch(tokens=torch.tensor(tokens, dtype=torch.long, device=device), positions=position_ids,
                             num_decode_tokens=len(decodes),
                             decode=_paged(decodes, device, shared_rows) if decodes else None,
                             prefill=_paged(chunks, device) if chunks else None)
        model = self.model
        return self.module(hidden, batch.tokens, self.cache, batch, model.cos[position_ids], model.sin[position_ids])


def _paged(entries: list[tuple[list[int], int, int]], device, shared_rows: bool = False) -> PagedBatch:
    """A PagedBatch of (block table, seq_len, query tokens) entries."""
    width = max(len(table) for table, _, _ in entries)
    tables = torch.tensor([table + [0] * (width - len(table)) for table, _, _ in entries], dtype=torch.int32)
    query_start = [0]
    for _, _, count in entries:
        query_start.append(query_start[-1] + count)
    seq_lens = [n for _, n, _ in entries]
    return PagedBatch(block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
                      max_query_len=max(c for _, _, c in entries), max_seq_len=max(seq_lens), shared_rows=shared_rows)
