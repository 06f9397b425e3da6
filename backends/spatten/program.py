"""The program SpAtten executes: one request per (iteration, layer, head), in the RTL testbench's format.

The public RTL (github.com/mit-han-lab/spatten) is driven by a CSV with one row per request; its columns
are `HeadRequest`'s first seventeen fields, in that order, with the same spellings (`embedding_length_D`,
`sentence_length_L`), so a `Program` written with `to_csv` runs unchanged in the RTL's `TestSpAtten` and a
trace from the RTL's `hardware/workloads/` reads back with `from_csv`.

The CSV cannot say two things the simulator needs, so they live elsewhere:
- how many query rows a request carries. The RTL's request holds one query (a GPT-2 generation step).
  BERT, and GPT-2's prompt (summarization) stage, send every kept token as a query against keys fetched
  once per head; the number is derived, not stored: `key_fetch_num` for BERT and for iteration 0 of a
  GPT-2 program with `prompt_stage`, 1 otherwise (`Program.query_rows`).
- `requant_fraction`, the measured fraction of the request's query rows whose largest attention
  probability fell below tau and so needed the key LSBs (JSON only). In the CSV the RTL's `if_requant`
  flag carries it: for a one-query request the flag *is* the outcome (the GPT-2-small trace flags 7.0% of
  requests), so `from_csv` reads it back as 1.0 or 0.0.

Conventions kept from the RTL: -1 in a bit-width or threshold column means "not used" (full 12-bit words,
no re-quantization); `sentence_length_L` is the unpruned length (the context for GPT-2), `key_fetch_num`
the tokens kept.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import astuple, dataclass, field, fields
from typing import Literal

import numpy as np

__all__ = ["CSV_COLUMNS", "HeadRequest", "Mode", "Program"]

Mode = Literal["bert", "gpt2"]
_FORMAT = "pcc.spatten.program"
_VERSION = 1


@dataclass(frozen=True)
class HeadRequest:
    """One head of one layer at one iteration (a GPT-2 step; BERT has iteration 0 only)."""

    iteration_id: int
    layer_id: int
    head_id: int
    embedding_length_D: int  # head dimension
    sentence_length_L: int  # unpruned tokens (GPT-2: current context length)
    key_fetch_num: int  # key rows fetched (tokens kept by cascade token pruning)
    quant_key_bit: int  # MSB bits fetched per key element; -1: the whole word
    quant_query_bit: int  # -1: the machine's query width
    auto_requant_thres: float  # tau; -1 without progressive quantization
    if_requant: bool  # some query row of this request re-quantizes (RTL: forces it)
    auto_requant_incre: int  # LSB bits fetched on re-quantization; -1: the machine's
    value_fetch_num: int  # value rows fetched (local value pruning keeps the top ones)
    quant_value_bit: int  # -1: the whole word
    if_accumulate_importance: bool  # add this head's probabilities to the token scores (adds only)
    if_rescale_previous_importance: bool  # RTL flag, carried through; costs nothing in the model
    if_topk: bool  # run the token top-k after this request (cascade pruning for the next layer)
    topk: int  # tokens it keeps, of this request's keys if fewer, else of all L (next step); -1: none
    requant_fraction: float = 0.0  # not an RTL column (see module docstring)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.key_fetch_num <= self.sentence_length_L:
            problems.append(f"key_fetch_num {self.key_fetch_num} outside [1, L={self.sentence_length_L}]")
        if not 1 <= self.value_fetch_num <= self.key_fetch_num:
            problems.append(f"value_fetch_num {self.value_fetch_num} outside [1, key_fetch_num]")
        if not 0 <= self.requant_fraction <= 1 or (self.requant_fraction > 0 and not self.if_requant):
            problems.append(f"requant_fraction {self.requant_fraction} needs if_requant and [0, 1]")
        if self.if_topk and not 1 <= self.topk <= self.sentence_length_L:
            problems.append(f"topk {self.topk} outside [1, L]")
        if self.embedding_length_D < 1:
            problems.append(f"embedding_length_D {self.embedding_length_D} < 1")
        if problems:
            where = f"request (iteration {self.iteration_id}, layer {self.layer_id}, head {self.head_id})"
            raise ValueError(f"{where}: " + "; ".join(problems))


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(HeadRequest))[:17]
_TYPES = {f.name: f.type for f in fields(HeadRequest)}  # annotations are strings under `from __future__`


def _csv_cell(name: str, value: object) -> str:
    """Format a value the way the RTL's traces spell it ("64.0", "0.05", "-1", "True")."""
    if name == "embedding_length_D":
        return str(float(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _parse_cell(name: str, text: str) -> object:
    kind = _TYPES[name]
    if kind == "bool":
        if text not in ("True", "False"):
            raise ValueError(f"column {name}: expected True or False, got {text!r}")
        return text == "True"
    if kind == "int":
        number = float(text)
        if not number.is_integer():
            raise ValueError(f"column {name}: expected an integer, got {text!r}")
        return int(number)
    return float(text)


@dataclass
class Program:
    """The requests of one workload plus what the CSV does not carry: mode and model shape.

    `hidden` and `ffn` are not used by the attention simulator (SpAtten runs attention only; the host runs
    the projections and the FFN); they are kept so that a program describes its model completely.
    """

    mode: Mode
    layers: int
    heads: int
    head_dim: int
    requests: list[HeadRequest]
    hidden: int = 0  # 0: heads x head_dim
    ffn: int = 0  # 0: 4 x hidden
    prompt_stage: bool = False  # gpt2: iteration 0 is the summarization stage over the prompt
    name: str = ""
    metadata: dict[str, object] = field(default_factory=dict)  # free-form provenance, JSON only

    def __post_init__(self) -> None:
        if self.mode not in ("bert", "gpt2"):
            raise ValueError(f"mode must be 'bert' or 'gpt2', got {self.mode!r}")
        if self.prompt_stage and self.mode != "gpt2":
            raise ValueError("prompt_stage describes GPT-2's summarization stage; BERT programs have none")
        if not self.requests:
            raise ValueError("a program needs at least one request")
        self.hidden = self.hidden or self.heads * self.head_dim
        self.ffn = self.ffn or 4 * self.hidden
        for request in self.requests:
            if request.layer_id >= self.layers or request.head_id >= self.heads or request.layer_id < 0:
                raise ValueError(
                    f"request (iteration {request.iteration_id}, layer {request.layer_id}, head {request.head_id}) "
                    f"is outside the model's {self.layers} layers x {self.heads} heads"
                )

    def column(self, name: str) -> np.ndarray:
        """One field of every request, as an array (the simulator's vectorised view)."""
        return np.array([getattr(request, name) for request in self.requests])

    def query_rows(self) -> np.ndarray:
        """Query rows per request: every kept token in BERT and GPT-2's prompt stage, else one."""
        keys = self.column("key_fetch_num")
        if self.mode == "bert":
            return keys
        prompt = self.prompt_stage & (self.column("iteration_id") == 0)
        return np.where(prompt, keys, 1)

    # --- JSON: everything, exactly ---------------------------------------------------------------

    def to_json(self) -> str:
        header = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "requests"}
        body = {"columns": [f.name for f in fields(HeadRequest)], "requests": [list(astuple(r)) for r in self.requests]}
        return json.dumps({"format": _FORMAT, "version": _VERSION, **header, **body})

    @classmethod
    def from_json(cls, text: str) -> Program:
        data = json.loads(text)
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} version {_VERSION} document")
        columns = data.pop("columns")
        if columns != [f.name for f in fields(HeadRequest)]:
            raise ValueError(f"unexpected request columns {columns}")
        requests = [HeadRequest(**dict(zip(columns, row))) for row in data.pop("requests")]
        del data["format"], data["version"]
        return cls(requests=requests, **data)

    # --- CSV: the RTL's columns --------------------------------------------------------------------

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for request in self.requests:
            writer.writerow([_csv_cell(name, getattr(request, name)) for name in CSV_COLUMNS])
        return out.getvalue()

    @classmethod
    def from_csv(
        cls,
        text: str,
        *,
        mode: Mode,
        layers: int | None = None,
        heads: int | None = None,
        hidden: int = 0,
        ffn: int = 0,
        prompt_stage: bool = False,
        name: str = "",
    ) -> Program:
        """Read an RTL-format CSV. Rows whose iteration_id is not an integer are skipped, as the RTL's
        testbench does (its traces end with a row naming the config file). Layers, heads and the head
        dimension default to what the rows show."""
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise ValueError(f"CSV header must be the RTL's columns {', '.join(CSV_COLUMNS)}; got {header}")
        requests = []
        for line, row in enumerate(reader, start=2):
            if not row or not row[0].lstrip("-").isdigit():
                continue
            try:
                values = {name: _parse_cell(name, cell) for name, cell in zip(CSV_COLUMNS, row, strict=True)}
                requests.append(HeadRequest(**values, requant_fraction=float(values["if_requant"])))
            except ValueError as error:
                raise ValueError(f"CSV line {line}: {error}") from None
        if not requests:
            raise ValueError("the CSV has no request rows")
        return cls(
            mode=mode,
            layers=layers or 1 + max(r.layer_id for r in requests),
            heads=heads or 1 + max(r.head_id for r in requests),
            head_dim=requests[0].embedding_length_D,
            requests=requests,
            hidden=hidden,
            ffn=ffn,
            prompt_stage=prompt_stage,
            name=name,
        )
