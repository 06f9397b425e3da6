"""Programs without a model: from a pruning schedule, and the dense baseline of any program.

Benchmarks need BERT-base- and GPT-2-small-shaped workloads at the paper's settings without running a
network; the lowering from ONNX needs the unpruned twin of what it emits. Both are built here so that the
two sides of a comparison follow the same request conventions.

Schedule semantics (the RTL's GPT-2 traces, e.g. `summary-gpt2-small-wikitext2-per8.csv`):
- `token_keep[l]` is the fraction of the *final* length kept as keys at layer l: floor(keep x R), with
  R = seq_len for BERT and seq_len + generated_tokens for GPT-2 (the trace keeps 921 = floor(0.9 x 1024)
  keys at every step of a 992 + 32 run), never more than the tokens present, at least one, and
  non-increasing over layers (cascade: a pruned token never returns).
- `head_keep[l]`: floor(keep x heads) heads run at layer l, at least one, non-increasing.
- `value_keep`: local value pruning keeps floor(value_keep x keys) value rows of a one-query request
  (the trace: 184 = floor(0.2 x 921)). Requests with many query rows (BERT, GPT-2's prompt stage) fetch
  every kept value: each row keeps different values and their union is nearly all of them (the RTL's BERT
  model has no value pruning either).
- Progressive quantization is on when tau > 0: keys fetched at `msb_bits`, `lsb_bits` more on demand.
  A many-row request carries `requant_fraction` as the fraction of its rows that re-quantize; one-query
  requests are flagged individually, evenly spread so that exactly that fraction of them re-quantize, as in
  the trace (7.0% flagged), which keeps the CSV meaningful to the RTL (its `if_requant` forces it).
- The cascade token top-k runs after the last head of layer l when layer l+1 keeps fewer keys, over
  layer l's keys; after the last layer of a GPT-2 iteration it picks the next step's layer-0 tokens over
  the whole context (the trace flags that one `if_rescale_previous_importance`). Every layer at or before
  a top-k accumulates importance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pcc.backends.spatten.program import HeadRequest, Mode, Program

__all__ = ["dense_program", "program_from_schedule"]

_EPS = 1e-9  # floor(0.7 x 10) must be 7, not 6 from 6.9999999


def _cascade(fractions: Sequence[float], scale: int, cap: int) -> list[int]:
    """Per layer floor(fraction x scale), at least 1, at most `cap` and at most the layer before."""
    counts, previous = [], cap
    for fraction in fractions:
        previous = min(previous, max(1, math.floor(fraction * scale + _EPS)))
        counts.append(previous)
    return counts


def _spread(index: int, fraction: float) -> bool:
    """Whether item `index` is flagged so that exactly floor(n x fraction) of the first n are, evenly."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def program_from_schedule(
    mode: Mode,
    layers: int,
    heads: int,
    head_dim: int,
    seq_len: int,
    token_keep: Sequence[float],
    head_keep: Sequence[float],
    value_keep: float = 1.0,
    msb_bits: int = 12,
    lsb_bits: int = 4,
    requant_fraction: float = 0.0,
    tau: float = -1.0,
    generated_tokens: int = 0,
    *,
    value_bits: int | None = None,
    query_bits: int = 16,
    prompt_stage: bool = True,
    hidden: int = 0,
    ffn: int = 0,
    name: str = "",
) -> Program:
    """Requests for a BERT pass over `seq_len` tokens, or a GPT-2 run: the prompt stage over `seq_len`
    tokens (iteration 0, if `prompt_stage`) then `generated_tokens` one-query steps over the cache."""
    if len(token_keep) != layers or len(head_keep) != layers:
        raise ValueError(f"token_keep and head_keep need one fraction per layer ({layers})")
    if any(not 0 < k <= 1 for k in (*token_keep, *head_keep, value_keep)):
        raise ValueError("keep fractions must be in (0, 1]")
    if not 0 <= requant_fraction <= 1 or (requant_fraction > 0 and tau <= 0):
        raise ValueError("requant_fraction must be in [0, 1], and above 0 only with progressive quantization (tau > 0)")
    if mode == "bert" and (generated_tokens or value_keep != 1):
        raise ValueError("BERT runs one pass with every kept value: no generated tokens, value_keep 1")
    if mode == "gpt2" and not (prompt_stage or generated_tokens):
        raise ValueError("a GPT-2 program needs a prompt stage or generated tokens")

    progressive = tau > 0
    reference = seq_len + generated_tokens
    head_counts = _cascade(head_keep, heads, heads)
    # (iteration id, tokens present, many query rows?)
    iterations = [(0, seq_len, True)] if mode == "bert" or prompt_stage else []
    first_step = len(iterations)
    iterations += [(first_step + s, seq_len + s + 1, False) for s in range(generated_tokens if mode == "gpt2" else 0)]

    requests, one_query_seen = [], 0
    kept = [_cascade(token_keep, reference, length) for _, length, _ in iterations]
    for index, (iteration, length, many_rows) in enumerate(iterations):
        # topk[l]: tokens the top-k after layer l keeps, or None. Within an iteration, the next layer's
        # tokens; after the last layer, the next step's layer-0 tokens, chosen over the whole context.
        here = kept[index]
        topk: list[int | None] = [here[i + 1] if here[i + 1] < here[i] else None for i in range(layers - 1)]
        following = iterations[index + 1][1] if index + 1 < len(iterations) else 0
        topk.append(kept[index + 1][0] if following and kept[index + 1][0] < following else None)
        for layer in range(layers):
            keys = here[layer]
            values = keys if many_rows else max(1, math.floor(value_keep * keys + _EPS))
            for head in range(head_counts[layer]):
                if many_rows:
                    fraction = requant_fraction
                else:
                    fraction = float(_spread(one_query_seen, requant_fraction))
                    one_query_seen += 1
                selects = head == head_counts[layer] - 1 and topk[layer] is not None
                requests.append(HeadRequest(
                    iteration_id=iteration,
                    layer_id=layer,
                    head_id=head,
                    embedding_length_D=head_dim,
                    sentence_length_L=length,
                    key_fetch_num=keys,
                    quant_key_bit=msb_bits,
                    quant_query_bit=query_bits,
                    auto_requant_thres=tau if progressive else -1.0,
                    if_requant=fraction > 0,
                    auto_requant_incre=lsb_bits if progressive else -1,
                    value_fetch_num=values,
                    quant_value_bit=value_bits or msb_bits,
                    if_accumulate_importance=any(t is not None for t in topk[layer:]),
                    if_rescale_previous_importance=selects and layer == layers - 1,
                    if_topk=selects,
                    topk=topk[layer] if selects else -1,
                    requant_fraction=fraction,
                ))
    return Program(mode=mode, layers=layers, heads=heads, head_dim=head_dim, requests=requests, hidden=hidden,
                   ffn=ffn, prompt_stage=mode == "gpt2" and prompt_stage, name=name)


def dense_program(program: Program) -> Program:
    """The unpruned baseline of `program` on the same hardware: every iteration of it, with every layer
    and head, all L keys and values fetched as whole 12-bit words (-1 widths, the RTL's dense traces),
    no progressive quantization, no top-k. Queries keep the machine's query width in both programs, so the
    comparison isolates pruning and K/V quantization."""
    lengths: dict[int, int] = {}
    for request in program.requests:
        lengths[request.iteration_id] = max(lengths.get(request.iteration_id, 0), request.sentence_length_L)
    requests = [
        HeadRequest(iteration, layer, head, program.head_dim, length, length, -1, -1, -1.0, False, -1, length, -1,
                    False, False, False, -1)
        for iteration, length in sorted(lengths.items())
        for layer in range(program.layers)
        for head in range(program.heads)
    ]
    return Program(mode=program.mode, layers=program.layers, heads=program.heads, head_dim=program.head_dim,
                   requests=requests, hidden=program.hidden, ffn=program.ffn, prompt_stage=program.prompt_stage,
                   name=f"{program.name} (dense)" if program.name else "dense", metadata={"dense_of": program.name})
