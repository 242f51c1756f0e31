"""The engine configurations an evaluation compares, and the KV budget each one keeps.

Modes (one vLLM engine each, same model, same weights):

- ``full``: stock vLLM attention, every token of every head (the reference);
- ``razor``: the head profile's retrieval heads keep everything, the others sinks + window +
  compensation;
- ``streaming``: every head local with the same sink and window (StreamingLLM with RazorAttention's
  compensation token; ``compensation=False`` gives the original StreamingLLM);
- ``random``: as many retrieval heads as the profile has, chosen at random (the paper's control).

A sweep turns one razor setting into a series of variants (retrieval share, window, sink,
compensation on/off); every variant carries its own profile so the KV budget follows from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from razor_vllm.config import RazorProfile

MODES = ("full", "razor", "streaming", "random")
SWEEPS = ("retrieval_share", "window", "sink", "compensation", "prefill")
PREFILL_MODES = ("exact", "compressed")
ECHO_RATIO = 0.01  # the paper's echo share, kept in every retrieval-share variant


@dataclass(frozen=True)
class Variant:
    """One engine configuration: a mode, the heads it keeps whole and its local-head settings."""

    label: str
    mode: str
    profile: Optional[RazorProfile] = None  # None for full
    sink: int = 0
    window: int = 0
    compensation: bool = True
    prefill: str = "exact"  # razor's prefill mode ("exact": the paper; "compressed": the first design)

    @property
    def num_retrieval_heads(self) -> int:
        if self.mode == "full":
            return self.total_heads
        if self.mode == "streaming":
            return 0
        return self.profile.num_retrieval_heads

    @property
    def total_heads(self) -> int:
        return self.profile.total_kv_heads if self.profile is not None else 0

    def kv_budget(self, context: int) -> float:
        """Share of the full cache's KV entries this variant keeps for a ``context``-token request.

        Counts head-tokens: a retrieval head keeps ``context``, a local head the sinks, the window
        and one compensation token (block rounding and padding are left to ``razor-vllm bench``).
        """
        if self.mode == "full":
            return 1.0
        total = self.total_heads
        kept_local = min(context, self.sink + self.window + (1 if self.compensation else 0))
        retrieval = self.num_retrieval_heads
        return (retrieval * context + (total - retrieval) * kept_local) / (total * context)

    def razor_options(self, profile_path: Optional[Path]) -> dict[str, Any]:
        """``additional_config["razor"]`` for this variant (``profile_path``: where its profile is saved)."""
        options: dict[str, Any] = dict(
            sink=self.sink, window=self.window, compensation=self.compensation, prefill=self.prefill
        )
        if self.mode == "streaming":
            options["all_local"] = True
        if profile_path is not None:
            options["profile"] = str(profile_path)
        return options

    def describe(self) -> dict[str, Any]:
        return dict(
            label=self.label,
            mode=self.mode,
            retrieval_heads=self.num_retrieval_heads,
            total_heads=self.total_heads,
            sink=self.sink,
            window=self.window,
            compensation=self.compensation,
            prefill=self.prefill,
        )


def base_variants(
    modes: list[str],
    profile: RazorProfile,
    sink: Optional[int] = None,
    window: Optional[int] = None,
    compensation: bool = True,
    seed: int = 0,
) -> list[Variant]:
    """The requested modes around one profile (sink/window default to the profile's)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    sink = profile.sink if sink is None else sink
    window = profile.window if window is None else window
    made = []
    for mode in modes:
        if mode == "full":
            made.append(Variant("full", "full", profile))
        elif mode == "random":
            made.append(Variant("random", "random", random_profile(profile, seed), sink, window, compensation))
        else:
            made.append(Variant(mode, mode, profile, sink, window, compensation))
    return made


def random_profile(profile: RazorProfile, seed: int) -> RazorProfile:
    """As many retrieval heads as ``profile`` has, drawn uniformly from all KV heads."""
    n_kv = profile.model.num_kv_heads
    every = [(layer, head) for layer in range(profile.model.num_layers) for head in range(n_kv)]
    chosen = random.Random(seed).sample(every, profile.num_retrieval_heads)
    heads = [sorted(h for l, h in chosen if l == layer) for layer in range(profile.model.num_layers)]
    return _with_heads(profile, heads, f"random {profile.num_retrieval_heads} heads, seed {seed}")


def share_profile(profile: RazorProfile, share: float) -> RazorProfile:
    """Re-select retrieval heads from the profile's stored scores so about ``share`` of them are kept:
    the top ``share - 1%`` by induction united with the top 1% by echo (the paper's rule)."""
    from razor_vllm.profile.selectors import EchoInductionSelector

    if not 0.0 < share <= 1.0:
        raise ValueError(f"retrieval share must be in (0, 1], got {share}")
    echo = min(ECHO_RATIO, share)
    selector = EchoInductionSelector(induction_ratio=max(share - echo, 0.0), echo_ratio=echo)
    heads = selector.select(profile).retrieval_heads
    return _with_heads(profile, heads, f"retrieval share {share:g} re-selected from the stored scores")


def _with_heads(profile: RazorProfile, heads: list[list[int]], note: str) -> RazorProfile:
    provenance = profile.provenance.model_copy(update=dict(command=f"razor-vllm eval: {note}"))
    return profile.model_copy(update=dict(retrieval_heads=heads, provenance=provenance))


def sweep_variants(
    name: str,
    values: list[str],
    profile: RazorProfile,
    sink: Optional[int] = None,
    window: Optional[int] = None,
    compensation: bool = True,
) -> list[Variant]:
    """``razor`` variants along one setting (values as given on the command line)."""
    return grid_variants([(name, values)], profile, sink, window, compensation)


def grid_variants(
    sweeps: list[tuple[str, list[str]]],
    profile: RazorProfile,
    sink: Optional[int] = None,
    window: Optional[int] = None,
    compensation: bool = True,
) -> list[Variant]:
    """``razor`` variants at every combination of the sweeps' values (one sweep: a series; two, e.g.
    retrieval share and window: the grid an accuracy-vs-KV-budget front is read from)."""
    for name, _ in sweeps:
        if name not in SWEEPS:
            raise ValueError(f"unknown sweep {name!r}; choose from {', '.join(SWEEPS)}")
    names = [name for name, _ in sweeps]
    if len(set(names)) != len(names):
        raise ValueError(f"each setting can be swept once, got {', '.join(names)}")
    base = Variant(
        "razor",
        "razor",
        profile,
        profile.sink if sink is None else sink,
        profile.window if window is None else window,
        compensation,
    )
    made = [base]
    for name, values in sweeps:
        made = [_with_setting(v, name, raw, profile) for v in made for raw in values]
    return made


def _with_setting(variant: Variant, name: str, raw: str, profile: RazorProfile) -> Variant:
    """``variant`` with one setting changed and the change appended to its label."""
    if name == "retrieval_share":
        share = float(raw.rstrip("%")) / (100 if raw.endswith("%") else 1)
        p = share_profile(profile, share)
        return replace(variant, label=f"{variant.label} share={p.num_retrieval_heads}/{p.total_kv_heads}", profile=p)
    if name == "window":
        return replace(variant, label=f"{variant.label} W={int(raw)}", window=int(raw))
    if name == "sink":
        return replace(variant, label=f"{variant.label} S={int(raw)}", sink=int(raw))
    if name == "prefill":
        mode = _prefill_mode(raw)
        return replace(variant, label=f"{variant.label} prefill={mode}", prefill=mode)
    on = _parse_bool(raw)
    return replace(variant, label=f"{variant.label} comp={'on' if on else 'off'}", compensation=on)


def with_prefill_modes(variants: list[Variant], modes: list[str]) -> list[Variant]:
    """Every razor-backed variant (all but ``full``) once per prefill mode; the first mode keeps the
    label, the others get " (MODE prefill)" appended."""
    modes = [_prefill_mode(m) for m in modes]
    made = []
    for variant in variants:
        if variant.mode == "full":
            made.append(variant)
            continue
        for i, mode in enumerate(modes):
            label = variant.label if i == 0 else f"{variant.label} ({mode} prefill)"
            made.append(replace(variant, label=label, prefill=mode))
    return made


def _prefill_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill modes are {', '.join(PREFILL_MODES)}, got {raw!r}")
    return mode


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"compensation sweep values are on/off, got {raw!r}")
