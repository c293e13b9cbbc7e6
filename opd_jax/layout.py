"""`RowLayout`: which rows of a step's batch belong to which domain and teacher, computed once.

A step's batch has one block of rows per domain, domains in sorted order, `per_domain` prompts each;
an on-policy part repeats every prompt `group_size` times (a prompt's samples are contiguous: GRPO
groups), an off-policy part (dataset answers, GKD) holds each prompt once:

    rows(part)          = len(domains) * per_domain * (group_size if part == "on" else 1)
    domain of row r     = domains[r // (rows(part) / len(domains))]
    teacher of row r    = routes[that domain's index]

The trainer, teacher scoring, the update and the planner all read this one object.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_jax.errors import OpdError


def row_groups(routes: tuple, rows: int) -> dict[str, list[int]]:
    """Teacher name -> its row indices, for a batch of `rows` rows in len(routes) equal domain blocks
    (routes[i]: the teacher of block i); names sorted."""
    r = rows // len(routes)
    return {n: [i for d, m in enumerate(routes) if m == n for i in range(d * r, (d + 1) * r)]
            for n in sorted(set(routes))}


@dataclass(frozen=True)
class RowLayout:
    domains: tuple  # sorted
    routes: tuple  # teacher name of each domain ("" = no teacher: pure reward RL)
    per_domain: int
    group_size: int
    parts: tuple  # ("on",), ("off",) or ("on", "off")

    @classmethod
    def build(cls, domains, routing: dict, per_domain: int, group_size: int, lam: float) -> "RowLayout":
        domains = tuple(sorted(domains))
        parts = tuple(k for k, used in (("on", lam > 0), ("off", lam < 1)) if used)
        return cls(domains, tuple(routing.get(d, "") for d in domains), per_domain, group_size, parts)

    @classmethod
    def from_config(cls, cfg, domains=None) -> "RowLayout":
        """From a config; `domains` default: the built-in ones named in data.domains plus, with a prompt
        file (data.path), the domains it is routed by (the planner does not read the file)."""
        if domains is None:
            names = set(cfg.data.domains) | (set(cfg.routing) if cfg.data.path else set())
            domains = names or {"data"}
        dc = cfg.data
        return cls.build(domains, cfg.routing, dc.per_domain, dc.group_size, cfg.loss.lam)

    def rows(self, part: str = "on") -> int:
        return len(self.domains) * self.per_domain * (self.group_size if part == "on" else 1)

    def part_rows(self) -> dict:
        """part -> rows per step."""
        return {p: self.rows(p) for p in self.parts}

    def teachers(self) -> tuple:
        """Names of the teachers some domain routes to, sorted."""
        return tuple(sorted({r for r in self.routes if r}))

    def groups(self, rows: int) -> dict:
        """Teacher name -> its row indices (its domains' blocks, in domain order) for a batch of `rows`
        rows in len(domains) equal blocks; names sorted."""
        return row_groups(self.routes, rows)

    def slices(self, rows: int) -> dict:
        """Teacher name -> the row slices of its domains (for per-teacher metrics)."""
        r = rows // len(self.domains)
        out: dict = {}
        for d, name in enumerate(self.routes):
            out.setdefault(name, []).append(slice(d * r, (d + 1) * r))
        return out

    def check_micro_batch(self, micro: int, hidden: bool, baseline: str = "none"):
        """One-line errors for a `train.micro_batch` that cannot split the step's rows exactly. In the
        hidden-state modes (`hidden`) each teacher's rows are a separate forward/backward (its own
        output matrix), so `micro` must also divide those."""
        if micro < 0:
            raise OpdError(f"train.micro_batch must be >= 0 (0 = all rows at once), got {micro}")
        rows = self.part_rows()
        if not micro or all(micro >= r for r in rows.values()):
            return
        for part, r in rows.items():
            if micro < r and r % micro:
                raise OpdError(f"train.micro_batch={micro} does not divide the {r} {part}-policy rows per step")
            if hidden and len(set(self.routes)) > 1:
                for name, idx in self.groups(r).items():
                    if micro < len(idx) and len(idx) % micro:
                        raise OpdError(f"train.micro_batch={micro} does not divide the {len(idx)} {part}-policy "
                                       f"rows routed to teacher {name!r}")
        if "on" in rows and micro < rows["on"] and micro % self.group_size:
            raise OpdError(f"train.micro_batch={micro} must be a multiple of data.group_size={self.group_size} "
                           "(a prompt's samples stay in one micro-batch)")
        if baseline == "loo":
            raise OpdError("loss.baseline=loo averages over the whole batch, so it cannot be split: "
                           "set train.micro_batch=0 or loss.baseline=none")
