"""Reading compiled programs: collective bytes per execution, and a roofline time on a TPU chip.

Collective bytes: every all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute in
a compiled HLO module, counted by its result bytes per device, times the trip count of every loop
around it (`known_trip_count`, which XLA records for loops with static bounds such as the scanned
layers; a loop without one, the decode loop that stops when every slot is done, counts once: so the
decode program compiled with one step per call gives the bytes of one step). Of a conditional's
branches (the decode attention's read lengths) the largest counts.

Roofline: a program's time on a chip is at least each of

    flops / peak FLOP/s,   HBM bytes accessed / HBM bandwidth,   collective bytes / ICI bandwidth

and the estimate is the largest of the three (perfect overlap, peak rates). Published figures per
chip (bf16), from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v5e, v5p,
v6e; read 2026-12-03). ICI is the bidirectional bandwidth per chip. How far such estimates sit from
measured TPU times is in docs/tpu.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from opd_jax.errors import OpdError


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, bidirectional, per chip
    hbm_gib: float


CHIPS = {
    "v5e": Chip("v5e", 197e12, 819e9, 400e9, 16),
    "v5p": Chip("v5p", 459e12, 2765e9, 1200e9, 95),
    "v6e": Chip("v6e", 918e12, 1638e9, 800e9, 32),
}


def chip(name: str) -> Chip:
    if name not in CHIPS:
        raise OpdError(f"unknown TPU chip {name!r}; the roofline knows {', '.join(CHIPS)}")
    return CHIPS[name]


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 4)
    return total


def collective_bytes(hlo_text: str) -> float:
    """Bytes per device that the collectives of one execution of the module's entry produce (see the
    module docstring for loops and conditionals)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m and line.rstrip().endswith("{"):
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            comps[current].append(line)
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards recursion
        own = 0.0
        for line in comps.get(name, ()):
            m = _COLLECTIVE.search(line)
            if m:
                own += _shape_bytes(m.group(1))
            if " while(" in line:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                for part in ("body", "condition"):  # both run once per iteration
                    called = re.search(part + r"=%([\w.\-]+)", line)
                    if called:
                        own += total(called.group(1)) * (int(trips.group(1)) if trips else 1)
            elif " conditional(" in line:
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                names += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
                own += max((total(b) for b in names), default=0.0)
            elif " call(" in line:
                called = re.search(r"to_apply=%([\w.\-]+)", line)
                if called:
                    own += total(called.group(1))
        memo[name] = own
        return own

    return total(entry) if entry else 0.0


@dataclass(frozen=True)
class Estimate:
    """One program on one chip: its FLOPs, HBM bytes and collective bytes per device, and the time each
    would take at the chip's peak rate; `seconds` is the largest (the bound)."""

    flops: float
    hbm_bytes: float
    collective_bytes: float
    chip: Chip

    @property
    def times(self) -> dict:
        return {"compute": self.flops / self.chip.peak_flops, "hbm": self.hbm_bytes / self.chip.hbm_bandwidth,
                "ici": self.collective_bytes / self.chip.ici_bandwidth}

    @property
    def seconds(self) -> float:
        return max(self.times.values())

    @property
    def bound(self) -> str:
        t = self.times
        return max(t, key=t.get)


def estimate(compiled, chip_: Chip) -> Estimate:
    """The roofline of a compiled program (`jax.stages.Compiled`): XLA's cost analysis for FLOPs and
    bytes accessed, the HLO text for collectives. Loop bodies count once in XLA's cost analysis, so
    compile with the layers unrolled (`models.transformer.unrolled_layers`)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Estimate(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    collective_bytes(compiled.as_text()), chip_)
