"""Method specs: one short string per method variant to evaluate.

Grammar (modifiers in any order after the base; ``/mode`` and ``:schedule`` at the end)::

    spec      := base modifier* [":" schedule] ["/" precompute]
    base      := full | prefix | reuse | blend | epic
    modifier  := "-k" | "-v" | "-kv"        blend: KV deviation used by HKVD (default: config)
               | "-gradual"                 blend: check layers 1, 4 at ratios 0.3, 0.15
                                            (an "@" ratio narrows both, keeping the 2:1 shape)
               | "[" SELECTOR ("," SELECTOR)* "]"
                                            blend: how check layers rank tokens: hkvd | qa | qkvd
                                            | qa-chunk (cacheblend.config.SELECTORS); one for
                                            every check layer, or one per check layer
               | "~" NUMBER                 blend: adaptive budget: the smallest top-ranked set
                                            holding NUMBER of the selector's score mass, capped
                                            at the "@" ratio (BlendConfig.coverage)
               | "+first" INT               blend: also recompute each chunk's first INT tokens
               | "+probe" [INT]             blend, query-aware selectors: rank by a probe of the
                                            suffix over the cached KV, first INT layers, or
                                            every layer without INT (its cost comes out of
                                            the ratio: blend/probe.py)
               | "+drift" | "+nodrift"      blend: drift correction on (the config's scales, or
                                            DEFAULT_DRIFT where the config has it off) or off
                                            (blend/drift.py; CacheBlend's blend has none)
               | "+pool" NUMBER             blend: shrink each chunk's drift offset toward the
                                            request's (BlendConfig.drift_pool pseudo-tokens)
               | "+ramp" NUMBER             blend, with a probe: probed layer i of L weighs
                                            ((i + 1) / L) ** NUMBER (BlendConfig.probe_ramp)
               | "@" NUMBER                 blend: recompute ratio; epic: k (tokens per chunk)
    schedule  := "L" INT ["=" RATIO] ("," "L" INT ["=" RATIO])*
                                            blend: check layers and their ratios; the last
                                            layer's ratio is the "@" ratio when omitted
    precompute:= alone | sink | preamble | prefix   how chunks are precomputed (reuse/blend/epic)

Examples: ``blend@0.05``, ``blend-v@0.15``, ``blend-kv``, ``blend-gradual``,
``blend@0.15:L1=0.3,L4``, ``blend+first16``, ``epic@32``, ``reuse/sink``, ``blend[qa]@0.05``,
``blend[qkvd]@0.15:L2`` (check layer 2), ``blend[qkvd]@0.15:L1=0.3,L2`` (two stages),
``blend[qa-chunk]~0.5@0.3`` (adaptive, at most 30%), ``blend[qkvd]+probe30@0.15``,
``blend[qa,qkvd]+probe30@0.1:L0=0.2,L4`` (the question's attention at layer 0, then attention x
deviation at layer 4), ``blend[hkvd]-k+nodrift@0.15:L1`` (CacheBlend's own).

A spec turns into (engine method, BlendConfig); ``MethodSpec.request_blend(engine)`` is the
BlendConfig a request carries to be served that way (a per-request setting: the engine itself
is never changed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from cacheblend.config import DEFAULT_DRIFT, METHODS, PRECOMPUTE_MODES, SELECTORS, BlendConfig
from cacheblend.errors import ConfigError

GRADUAL_SCHEDULE = ((1, 0.3), (4, 0.15))
CHUNK_METHODS = ("reuse", "blend", "epic")  # methods that read precomputed chunk entries
DEFAULT_PRECOMPUTE = BlendConfig().precompute


class MethodSpecError(ConfigError):
    """A method spec that does not parse or does not apply to its base method."""


@dataclass(frozen=True)
class MethodSpec:
    label: str  # canonical text, used as the method's name in results
    method: str  # engine method
    ratio: float | None = None
    deviation: str | None = None
    schedule: tuple[tuple[int, float | None], ...] | None = None
    gradual: bool = False  # GRADUAL_SCHEDULE, narrowed by "@" like a request's ratio
    first_k: int | None = None
    epic_k: int | None = None
    precompute: str | None = None
    selector: str | tuple[str, ...] | None = None
    coverage: float | None = None
    probe_layers: int | None = None
    drift: bool | None = None
    drift_pool: float | None = None
    probe_ramp: float | None = None

    @property
    def uses_chunks(self) -> bool:
        return self.method in CHUNK_METHODS

    def blend_config(self, base: BlendConfig) -> BlendConfig:
        """``base`` with this spec's changes (validated by BlendConfig)."""
        changes: dict = {}
        if self.deviation is not None:
            changes["deviation"] = self.deviation
        if self.first_k is not None:
            changes["first_k"] = self.first_k
        if self.epic_k is not None:
            changes["epic_k"] = self.epic_k
        if self.precompute is not None:
            changes["precompute"] = self.precompute
        if self.selector is not None:
            changes["selector"] = self.selector
        if self.coverage is not None:
            changes["coverage"] = self.coverage
        if self.probe_layers is not None:
            changes["probe_layers"] = self.probe_layers
        if self.drift is not None:
            on = base.drift if any(base.drift) else DEFAULT_DRIFT
            changes["drift"] = on if self.drift else (0.0, 0.0)
        if self.drift_pool is not None:
            changes["drift_pool"] = self.drift_pool
        if self.probe_ramp is not None:
            changes["probe_ramp"] = self.probe_ramp
        if self.schedule is not None:
            last_ratio = self.schedule[-1][1]
            ratio = self.ratio if last_ratio is None else last_ratio
            ratio = base.ratio if ratio is None else ratio
            changes["check_layers"] = tuple(layer for layer, _ in self.schedule)
            changes["check_ratios"] = tuple(r for _, r in self.schedule[:-1]) + (ratio,)
        if self.gradual:
            changes["check_layers"] = tuple(layer for layer, _ in GRADUAL_SCHEDULE)
            changes["check_ratios"] = tuple(r for _, r in GRADUAL_SCHEDULE)
        layers = len(changes.get("check_layers", base.check_layers))
        if self.selector is None and not isinstance(base.selector, str) and \
                len(base.selector) != layers:
            raise MethodSpecError(
                f"method spec {self.label!r}: the default names one selector per check layer "
                f"({', '.join(base.selector)}), and this schedule has {layers}; name the "
                f"selector, e.g. blend[qa]... or blend[hkvd]-k...")
        config = replace(base, **changes)
        if self.ratio is not None and self.schedule is None:
            config = config.with_ratio(self.ratio)
        if self.deviation is not None and set(config.selectors) == {"qa"}:
            raise MethodSpecError(
                f"method spec {self.label!r}: the selector here is qa, which reads no KV "
                f"deviation; name one that does, e.g. blend[hkvd]-{self.deviation}")
        return config

    def request_blend(self, engine) -> BlendConfig:
        """The BlendConfig a request carries to be served as this spec. It never borrows: a
        row measures entries computed in its own precompute mode, whichever modes ran first."""
        return replace(self.blend_config(engine.config.blend), borrow=False)


# Modifiers "+xxxxN" that set a BlendConfig number.
_NUMBER_FIELDS = {"+pool": "drift_pool", "+ramp": "probe_ramp"}

_MODIFIER = re.compile(
    r"(-kv|-k|-v|-gradual|\+first\d+|\+probe\d*|\+drift|\+nodrift|\+pool[0-9.]+|\+ramp[0-9.]+|@[0-9.]+|~[0-9.]+"
    r"|\[[a-z,-]+\])")


def parse_method(text: str, precompute: str | None = None) -> MethodSpec:
    """Parse one spec; ``precompute`` applies when the spec has no ``/mode`` of its own."""
    spec = text.strip()
    if not spec:
        raise MethodSpecError("empty method spec")
    body, _, mode = spec.partition("/")
    body, _, schedule_text = body.partition(":")
    base = re.match(r"[a-z_]+", body)
    if base is None or base.group(0) not in METHODS:
        raise MethodSpecError(f"method spec {text!r}: the base must be one of "
                              f"{', '.join(METHODS)}")
    method, rest = base.group(0), body[base.end():]
    fields: dict = {}
    position = 0
    for match in _MODIFIER.finditer(rest):
        if match.start() != position:
            break
        position = match.end()
        _apply_modifier(text, method, match.group(0), fields)
    if position != len(rest):
        raise MethodSpecError(f"method spec {text!r}: cannot parse {rest[position:]!r}")
    if schedule_text:
        if method != "blend":
            raise MethodSpecError(f"method spec {text!r}: a schedule applies to blend only")
        if fields.get("gradual"):
            raise MethodSpecError(f"method spec {text!r}: -gradual and a schedule together")
        fields["schedule"] = _parse_schedule(text, schedule_text)
        _check_schedule(text, fields["schedule"], fields.get("ratio"))
    mode = mode or precompute
    if mode is not None:
        if mode not in PRECOMPUTE_MODES:
            raise MethodSpecError(f"method spec {text!r}: precompute must be one of "
                                  f"{', '.join(PRECOMPUTE_MODES)}")
        if method in CHUNK_METHODS:
            fields["precompute"] = mode
    label = body if method in CHUNK_METHODS else method
    label = f"{label}:{schedule_text}" if schedule_text else label
    if fields.get("precompute", DEFAULT_PRECOMPUTE) != DEFAULT_PRECOMPUTE:
        label = f"{label}/{fields['precompute']}"
    return MethodSpec(label=label, method=method, **fields)


def _apply_modifier(text: str, method: str, modifier: str, fields: dict) -> None:
    def once(name: str, value) -> None:
        if name in fields:
            raise MethodSpecError(f"method spec {text!r}: {modifier!r} repeats a setting")
        fields[name] = value

    if method in ("full", "prefix", "reuse"):
        raise MethodSpecError(f"method spec {text!r}: {method} takes no modifiers")
    if modifier.startswith("@"):
        value = modifier[1:]
        if method == "epic":
            if not value.isdigit():
                raise MethodSpecError(f"method spec {text!r}: epic@K needs an integer K")
            once("epic_k", int(value))
            return
        try:
            ratio = float(value)
        except ValueError:
            raise MethodSpecError(f"method spec {text!r}: bad ratio {value!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise MethodSpecError(f"method spec {text!r}: ratio must lie in [0, 1]")
        once("ratio", ratio)
        return
    if method != "blend":
        raise MethodSpecError(f"method spec {text!r}: {modifier!r} applies to blend only")
    if modifier.startswith("["):
        names = tuple(modifier[1:-1].split(","))
        if any(name not in SELECTORS for name in names):
            raise MethodSpecError(f"method spec {text!r}: selector must be one of "
                                  f"{', '.join(SELECTORS)}")
        once("selector", names[0] if len(names) == 1 else names)
    elif modifier.startswith("~"):
        try:
            coverage = float(modifier[1:])
        except ValueError:
            raise MethodSpecError(f"method spec {text!r}: bad coverage {modifier!r}") from None
        if not 0.0 < coverage < 1.0:
            raise MethodSpecError(f"method spec {text!r}: coverage must lie in (0, 1)")
        once("coverage", coverage)
    elif modifier in ("-k", "-v", "-kv"):
        once("deviation", modifier[1:])
    elif modifier == "-gradual":
        once("gradual", True)
    elif modifier in ("+drift", "+nodrift"):
        once("drift", modifier == "+drift")
    elif modifier[:5] in _NUMBER_FIELDS:  # +poolN, +rampN
        try:
            value = float(modifier[5:])
        except ValueError:
            raise MethodSpecError(f"method spec {text!r}: bad {modifier[1:5]} {modifier!r}") from None
        once(_NUMBER_FIELDS[modifier[:5]], value)
    elif modifier.startswith("+probe"):
        once("probe_layers", int(modifier[len("+probe"):] or -1))  # "+probe": every layer
    else:  # +firstN
        once("first_k", int(modifier[len("+first"):]))


def _parse_schedule(text: str, schedule: str) -> tuple[tuple[int, float | None], ...]:
    steps = []
    for item in schedule.split(","):
        match = re.fullmatch(r"L(\d+)(?:=([0-9.]+))?", item.strip())
        if match is None:
            raise MethodSpecError(f"method spec {text!r}: schedule items look like L1=0.3 or "
                                  f"L4, got {item!r}")
        try:
            ratio = float(match.group(2)) if match.group(2) is not None else None
        except ValueError:
            raise MethodSpecError(f"method spec {text!r}: bad ratio in {item!r}") from None
        steps.append((int(match.group(1)), ratio))
    return tuple(steps)


def _check_schedule(text: str, schedule, ratio: float | None) -> None:
    if any(r is None for _, r in schedule[:-1]):
        raise MethodSpecError(f"method spec {text!r}: every check layer but the last needs "
                              "a ratio (L1=0.3,L4)")
    last = schedule[-1][1]
    if last is not None and ratio is not None and abs(last - ratio) > 1e-12:
        raise MethodSpecError(f"method spec {text!r}: the last check ratio {last} differs "
                              f"from @{ratio}")
    layers = [layer for layer, _ in schedule]
    if layers != sorted(set(layers)):
        raise MethodSpecError(f"method spec {text!r}: check layers must increase")
    ratios = [r for _, r in schedule if r is not None] + ([ratio] if last is None and
                                                          ratio is not None else [])
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise MethodSpecError(f"method spec {text!r}: ratios must lie in [0, 1]")
    if ratios != sorted(ratios, reverse=True):
        raise MethodSpecError(f"method spec {text!r}: ratios must not increase")


def parse_methods(text: str, precompute_modes: list[str] | None = None) -> list[MethodSpec]:
    """A comma-separated list of specs, crossed with every precompute mode for the methods that
    read chunk entries (full and prefix appear once). Schedules and selector lists contain commas
    too: ``blend@0.15:L1=0.3,L4`` and ``blend[qa,qkvd]`` stay one spec (an item starting with
    L<digit> continues a schedule; an item after an unclosed "[" continues it)."""
    items: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        unclosed = items and items[-1].count("[") > items[-1].count("]")
        if unclosed or (re.match(r"L\d", item) and items and ":" in items[-1]):
            items[-1] += "," + item
        else:
            items.append(item)
    if not items:
        raise MethodSpecError("no methods given")
    specs: list[MethodSpec] = []
    for item in items:
        for mode in precompute_modes or [None]:
            spec = parse_method(item, mode)
            if spec.label not in {s.label for s in specs}:
                specs.append(spec)
    return specs
