"""The cross-chip collectives of a compiled program, read from its optimized HLO text.

Counts every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (their
asynchronous `-start` forms included) with the bytes of its result on one device, and how often it
runs per call of the program: an instruction inside a loop body runs once per trip (scanned layers:
once per layer). Trip counts come from the loop's `known_trip_count` when the compiler records one,
else from its condition `counter < constant` (counters start at 0 in the loops JAX emits); a loop
whose count cannot be read is counted once and flagged.

The TPU compiler may express a gather as an all-reduce of a zero-padded buffer: read the shapes,
not only the kinds.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3b11fnuz": 1,
    "s4": 0.5,
    "u4": 0.5,
}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLS = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONSTANT = re.compile(r"%(\S+) = s32\[\]\S* constant\((\d+)\)")
_LESS_THAN = re.compile(r"ROOT %\S+ = pred\[\]\S* compare\(%\S+, %(\S+)\), direction=LT")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the program.

  kind: one of KINDS. shapes: its result arrays as (dtype, dims). bytes: their size on one device.
  executions: how often it runs per call of the program. source: the JAX op that produced it.
  """

  kind: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  bytes: int
  executions: int
  source: str


@dataclasses.dataclass(frozen=True)
class CollectiveSummary:
  """Collectives of one program: per kind (instructions, executions per call, bytes per call)."""

  collectives: tuple[Collective, ...]
  unknown_trip_counts: int

  def by_kind(self) -> dict[str, tuple[int, int, int]]:
    table: dict[str, list[int]] = {k: [0, 0, 0] for k in KINDS}
    for c in self.collectives:
      row = table[c.kind]
      row[0] += 1
      row[1] += c.executions
      row[2] += c.bytes * c.executions
    return {k: tuple(v) for k, v in table.items()}  # type: ignore[misc]


def _type_and_opcode(line: str, start: int) -> tuple[str, str]:
  """(result type text, opcode) of the instruction whose type starts at line[start]."""
  if line[start] == "(":
    depth = 0
    for end in range(start, len(line)):
      depth += {"(": 1, ")": -1}.get(line[end], 0)
      if depth == 0:
        break
    type_text, rest = line[start : end + 1], line[end + 2 :]
  else:
    type_text, _, rest = line[start:].partition(" ")
  return type_text, rest.split("(", 1)[0]


def _arrays(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  return tuple(
      (dtype, tuple(int(d) for d in dims.split(",") if d))
      for dtype, dims in _ARRAY.findall(type_text)
      if dtype in _BYTES
  )


def _kind(opcode: str) -> str | None:
  """The collective kind of an opcode; None for others and for `-done` halves of async pairs."""
  base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
  return base if base in KINDS else None


def summarize(hlo_text: str) -> CollectiveSummary:
  """Every collective of an optimized HLO module (text), with executions per program call."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.rstrip() == "}":  # attribute values may span lines that start with "}}"
      current = None
    elif current is not None:
      computations[current].append(line)
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation: expected an optimized HLO module")

  executions: dict[str, int] = collections.defaultdict(int)
  unknown = 0

  def trip_count(line: str) -> int | None:
    found = _TRIP_COUNT.search(line)
    if found:
      return int(found.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", line)
    body = computations.get(condition.group(1), []) if condition else []
    constants = dict(m.groups() for m in map(_CONSTANT.search, body) if m)
    compare = next((m for m in map(_LESS_THAN.search, body) if m), None)
    return int(constants[compare.group(1)]) if compare and compare.group(1) in constants else None

  def visit(name: str, times: int) -> None:
    nonlocal unknown
    executions[name] += times
    for line in computations.get(name, []):
      called = list(_CALLS.findall(line))
      for names in _CALL_LISTS.findall(line):
        called += [("branch", n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
      if not called:
        continue
      trips = 1
      if " while(" in line:
        count = trip_count(line)
        unknown += count is None
        trips = 1 if count is None else count
      for role, callee in called:
        if role != "to_apply" and callee in computations:
          visit(callee, times * (trips if role == "body" else 1))

  visit(entry, 1)
  found = []
  for name, times in executions.items():
    for line in computations[name]:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      type_text, opcode = _type_and_opcode(line, match.end())
      kind = _kind(opcode)
      if kind is None:
        continue
      arrays = _arrays(type_text)
      if opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
        arrays = arrays[len(arrays) // 2 :]  # (operands..., results...): keep the results
      size = int(sum(_BYTES[d] * math.prod(dims) for d, dims in arrays))
      op_name = _OP_NAME.search(line)
      found.append(Collective(kind, arrays, size, times, op_name.group(1) if op_name else ""))
  return CollectiveSummary(tuple(found), unknown)


def with_dimension(collectives: Iterable[Collective], sizes: Iterable[int]) -> list[Collective]:
  """The collectives with a result dimension among `sizes` (e.g. the global batch size: an
  activation crossing chips where only parameters and gradients should)."""
  sizes = set(sizes)
  return [c for c in collectives if any(d in sizes for _, dims in c.shapes for d in dims)]
