"""Razor options from ``--additional-config '{"razor": {...}}'`` and the profile they resolve to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from razor_vllm.balance import resolve_mode
from razor_vllm.config import (
    ModelFingerprint,
    ProfileError,
    RazorProfile,
    check_profile_matches,
    find_profile_for,
    resolve_profile,
)

if TYPE_CHECKING:
    from razor_vllm.geometry import LocalGeometry

ADDITIONAL_CONFIG_KEY = "razor"


class RazorOptions(BaseModel):
    """User options. ``None`` means: take it from the profile.

    - ``profile``: path to a profile YAML or the name of a bundled one; default: the bundled
      profile whose fingerprint matches the served model.
    - ``window`` / ``sink``: recent-window and sink sizes (tokens) of local heads.
    - ``local_block_size``: tokens per block of the local pool (its window is recycled per block).
    - ``all_retrieval`` / ``all_local``: ignore the profile's head choice and keep a full cache for
      every head (checks exactness against stock vLLM), or for none (the StreamingLLM baseline).
    - ``compensation``: whether local heads keep the compensation token (default: the profile's,
      which defaults to true); ``False`` drops evicted tokens without it.
    - ``prefill``: ``"exact"`` (the paper, default): local heads attend causally to the whole prompt
      while it is prefilled (chunked or not), so the first answer token equals stock attention; the
      prompt's blocks outside sinks + window are freed once the prompt is done. ``"compressed"``
      (the first design): every query, prompt queries included, sees sinks + window + compensation,
      so a request never holds more than its window (smaller admission, approximate prompt).
    - ``window_rule``: ``"fixed"`` (default): every request keeps ``window`` recent tokens, a fixed
      memory bound. ``"paper"``: the paper's max(S0, N / C): a request with an N-token prompt keeps
      max(``window``, ceil(N / ``compression_ratio``)) recent tokens (the window grows with the
      prompt at compression ratio C).
    - ``compression_ratio``: C of the paper's rule (> 1; only with ``window_rule: paper``).
    - ``tp_balance``: how ranks of a parallel engine that the profile gives fewer retrieval heads
      fill the pool slots the heaviest rank needs (``balance.py``): ``promote`` their next-best
      heads by the profile's scores (default when it has scores) or ``pad`` (empty slots).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Optional[str] = None
    window: Optional[int] = Field(default=None, ge=1)
    sink: Optional[int] = Field(default=None, ge=0)
    local_block_size: int = Field(default=32, ge=1, le=1024)
    all_retrieval: bool = False
    all_local: bool = False
    compensation: Optional[bool] = None
    prefill: Literal["exact", "compressed"] = "exact"
    window_rule: Literal["fixed", "paper"] = "fixed"
    compression_ratio: Optional[float] = Field(default=None, gt=1)
    tp_balance: Optional[Literal["promote", "pad"]] = None

    @classmethod
    def from_additional_config(cls, additional_config: Optional[dict[str, Any]]) -> "RazorOptions":
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--additional-config razor must be a JSON object, got {raw!r}")
        try:
            options = cls.model_validate(raw)
        except ValidationError as exc:
            details = "; ".join(
                f"razor.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
            )
            raise ValueError(f"invalid razor options in --additional-config: {details}") from exc
        if options.all_retrieval and options.all_local:
            raise ValueError("razor options all_retrieval and all_local exclude each other")
        if options.window_rule == "paper" and options.compression_ratio is None:
            raise ValueError("razor option window_rule 'paper' needs razor.compression_ratio (C in max(S0, N/C))")
        if options.window_rule == "fixed" and options.compression_ratio is not None:
            raise ValueError("razor option compression_ratio applies only with razor.window_rule 'paper'")
        return options


class ResolvedRazorConfig(BaseModel):
    """The profile with user overrides applied: what the backend actually serves."""

    model_config = ConfigDict(frozen=True)

    profile: RazorProfile
    profile_source: str
    retrieval_heads: list[list[int]]
    sink: int
    window: int
    local_block_size: int
    compensation: bool = True
    exact_prefill: bool = True
    tp_balance: Optional[str] = None  # as given; balance.resolve_mode picks the default
    compression_ratio: Optional[float] = None  # None: fixed window; else the paper's max(window, N / C)

    def local_rule(self) -> "LocalGeometry":
        """The local pool's block arithmetic for these settings (``razor_vllm.geometry``)."""
        from razor_vllm.geometry import LocalGeometry

        return LocalGeometry(
            sink=self.sink,
            window=self.window,
            block_size=self.local_block_size,
            exact_prefill=self.exact_prefill,
            compression_ratio=self.compression_ratio,
        )


def resolve(options: RazorOptions, served: ModelFingerprint) -> ResolvedRazorConfig:
    """Find and check the profile, apply overrides; raises ProfileError / ValueError with a clear message."""
    if options.profile is not None:
        profile = resolve_profile(options.profile)
        source = options.profile
        check_profile_matches(profile, served, source=f"profile '{source}'")
    else:
        profile = find_profile_for(served)
        source = "bundled profile for " + served.architecture
    heads = [list(h) for h in profile.retrieval_heads]
    if options.all_retrieval:
        heads = [list(range(served.num_kv_heads)) for _ in range(served.num_layers)]
    elif options.all_local:
        heads = [[] for _ in range(served.num_layers)]
    sink = profile.sink if options.sink is None else options.sink
    window = profile.window if options.window is None else options.window
    if window < 1:
        raise ValueError(f"razor window must be >= 1, got {window}")
    if sink < 0:
        raise ValueError(f"razor sink must be >= 0, got {sink}")
    return ResolvedRazorConfig(
        profile=profile,
        profile_source=source,
        retrieval_heads=heads,
        sink=sink,
        window=window,
        local_block_size=options.local_block_size,
        compensation=profile.compensation if options.compensation is None else options.compensation,
        exact_prefill=options.prefill == "exact",
        compression_ratio=options.compression_ratio if options.window_rule == "paper" else None,
        tp_balance=resolve_mode(options.tp_balance, bool(profile.scores)),
    )


def resolve_for_vllm_config(vllm_config: Any) -> ResolvedRazorConfig:
    """Resolve razor options against the model vLLM is about to serve."""
    options = RazorOptions.from_additional_config(vllm_config.additional_config)
    served = ModelFingerprint.from_hf_config(vllm_config.model_config.hf_config)
    try:
        return resolve(options, served)
    except ProfileError as exc:
        raise ProfileError(f"razor cannot serve {vllm_config.model_config.model}: {exc}") from None
