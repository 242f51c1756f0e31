"""Head profiles: the schema, loading, saving and matching against a served model.

A profile names, for one model, which KV heads are retrieval heads (kept with a
full cache) and the sink/window defaults for every other head. The YAML on disk
is the pydantic model's dump, so a profile round-trips exactly, and a malformed
or mismatched profile is refused with a message that names the bad field.
"""

from __future__ import annotations

import datetime as _dt
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A profile that cannot be used: malformed, missing, or for another model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFingerprint(_Strict):
    """What must agree between a profile and the model it is applied to.

    The shape fields (architecture .. position_encoding) must agree for a profile to be usable at
    all. ``context_length`` and ``rope_scaling`` tell apart checkpoints of one shape (Llama-3-8B-
    Instruct and Llama-3.1-8B-Instruct differ only there: 8192 tokens and plain RoPE vs 131072 and
    ``llama3`` scaling x8); they take part in choosing a bundled profile automatically, not in
    checking a profile the user names. ``None`` (profiles written before they existed) matches any.
    """

    architecture: str
    model_type: str
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    position_encoding: Literal["rope", "alibi", "other"]
    # Identity of the checkpoint among models of one shape (optional; None matches any model).
    context_length: Optional[int] = Field(default=None, gt=0)
    rope_scaling: Optional[str] = None

    #: Fields a profile must share with the model it is applied to (the rest identify a checkpoint).
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "architecture",
        "model_type",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
        "head_size",
        "vocab_size",
        "position_encoding",
    )

    @model_validator(mode="after")
    def _gqa_divides(self) -> "ModelFingerprint":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        return self

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelFingerprint":
        """Fingerprint of a transformers ``PretrainedConfig`` (text config for multimodal models)."""
        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        archs = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
        n_heads = _first_attr(cfg, "num_attention_heads", "n_head", "num_heads")
        n_kv = _first_attr(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=None)
        if getattr(cfg, "multi_query", False):
            n_kv = 1
        hidden = _first_attr(cfg, "hidden_size", "n_embd", "d_model")
        head_size = getattr(cfg, "head_dim", None) or hidden // n_heads
        return cls(
            architecture=archs[0],
            model_type=getattr(cfg, "model_type", "unknown"),
            num_layers=_first_attr(cfg, "num_hidden_layers", "n_layer", "num_layers"),
            num_attention_heads=n_heads,
            num_kv_heads=n_kv or n_heads,
            head_size=head_size,
            vocab_size=cfg.vocab_size,
            position_encoding=position_encoding_of(cfg),
            context_length=_context_length_of(cfg),
            rope_scaling=rope_scaling_of(cfg),
        )

    def mismatches(self, served: "ModelFingerprint", identity: bool = False) -> list[str]:
        """Human-readable differences ``profile value != served value``; empty when they agree.

        ``identity=False``: the shape fields only (is the profile usable for this model at all);
        ``identity=True``: also the checkpoint's context length and RoPE scaling where the profile
        names them (is this the profile *of* this model).
        """
        names = type(self).model_fields if identity else self.SHAPE_FIELDS
        out = []
        for name in names:
            mine, theirs = getattr(self, name), getattr(served, name)
            if name not in self.SHAPE_FIELDS and mine is None:
                continue
            if mine != theirs:
                out.append(f"{name}: profile has {mine!r}, model has {theirs!r}")
        return out

    @property
    def identity_fields(self) -> int:
        """How many of the optional identity fields this fingerprint names (more = more specific)."""
        return sum(getattr(self, name) is not None for name in type(self).model_fields if name not in self.SHAPE_FIELDS)


def position_encoding_of(cfg: Any) -> str:
    """``alibi``, ``rope`` or ``other``, from what the config itself says about positions.

    ALiBi markers: Falcon's ``alibi`` flag, ``position_encoding_type: alibi``, MPT's
    ``attn_config.alibi``, BLOOM (ALiBi is its only encoding). RoPE markers: ``rope_theta``,
    ``rope_scaling``, ``rope_parameters``. Baichuan's remote code names neither: its 7B models
    (Baichuan-7B, Baichuan2-7B) use RoPE and their configs declare the rotary table's
    ``max_position_embeddings``; the 13B models use ALiBi and declare only ``model_max_length``.
    So a Baichuan config is RoPE when it declares ``max_position_embeddings`` and ALiBi otherwise
    (the family name alone said ALiBi for both, which refused Baichuan2-7B, one of the paper's models).
    """
    model_type = getattr(cfg, "model_type", "")
    attn_config = getattr(cfg, "attn_config", None)
    mpt_alibi = (
        attn_config.get("alibi", False) if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    )
    declared = str(getattr(cfg, "position_encoding_type", None) or getattr(cfg, "position_embedding_type", None) or "")
    if getattr(cfg, "alibi", False) or declared.lower() == "alibi" or mpt_alibi or model_type == "bloom":
        return "alibi"
    if declared.lower() in ("rope", "rotary"):
        return "rope"
    if any(getattr(cfg, name, None) is not None for name in ("rope_theta", "rope_scaling", "rope_parameters")):
        return "rope"
    if model_type == "baichuan":
        return "rope" if getattr(cfg, "max_position_embeddings", None) is not None else "alibi"
    return "other"


def _context_length_of(cfg: Any) -> Optional[int]:
    value = getattr(cfg, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def rope_scaling_of(cfg: Any) -> Optional[str]:
    """The RoPE variant as one short string: ``default``, or ``<type> x<factor>`` (``llama3 x8``,
    ``linear x8``, ``yarn x4``); None for models without RoPE or a layout this does not read
    (per-layer-type ``rope_parameters``).

    Reads transformers 5's ``rope_parameters`` and the config.json form (``rope_scaling``) alike.
    """
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = getattr(cfg, "rope_scaling", None)
        if params is None:
            return "default" if getattr(cfg, "rope_theta", None) is not None else None
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type") or params.get("type")
    if kind is None:
        return None if any(isinstance(v, dict) for v in params.values()) else "default"
    if kind == "default":
        return "default"
    factor = params.get("factor")
    return f"{kind} x{float(factor):g}" if isinstance(factor, (int, float)) else str(kind)


def _first_attr(cfg: Any, *names: str, default: Any = ...) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if default is ...:
        raise ProfileError(f"model config has none of {names}")
    return default


class Provenance(_Strict):
    """How a profile was produced, enough to reproduce it."""

    method: Literal["echo_induction", "alibi_range", "duo_attention", "retrieval_head", "kvzip", "manual"]
    command: str
    tool_version: str
    created: str
    seed: Optional[int] = None
    probe_tokens: Optional[int] = Field(default=None, gt=0)
    probe_repeats: Optional[int] = Field(default=None, gt=1)
    probe_vocab_range: Optional[tuple[int, int]] = None
    induction_ratio: Optional[float] = Field(default=None, ge=0, le=1)
    echo_ratio: Optional[float] = Field(default=None, ge=0, le=1)
    alibi_eps: Optional[float] = Field(default=None, gt=0, lt=1)
    context_length: Optional[int] = Field(default=None, gt=0)
    source: Optional[str] = None
    # Imported head files (DuoAttention, Retrieval Head): the share of KV heads kept, or the score cut-off.
    ratio: Optional[float] = Field(default=None, ge=0, le=1)
    threshold: Optional[float] = None
    # Imported from a public repository (bundled profiles): where exactly, and under which licence.
    repository: Optional[str] = None
    commit: Optional[str] = None
    license: Optional[str] = None
    # Why the profile is what it is when its command alone does not say (e.g. the calibration run that
    # chose its ratios and window). Not carried over by a re-selection: that is a new decision.
    note: Optional[str] = None

    @field_validator("probe_vocab_range")
    @classmethod
    def _range_ordered(cls, value):
        if value is not None and not (0 <= value[0] < value[1]):
            raise ValueError(f"probe_vocab_range must be [low, high) with 0 <= low < high, got {list(value)}")
        return value


class RazorProfile(_Strict):
    """Retrieval heads of one model plus the sink/window defaults for its other heads."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelFingerprint
    # Hugging Face ids of the checkpoints this profile was made for (bundled profiles); when several
    # bundled profiles fit a served model, the one naming it wins.
    model_names: list[str] = Field(default_factory=list)
    sink: int = Field(ge=0)
    window: int = Field(ge=1)
    retrieval_heads: list[list[int]]
    # The compensation token for local heads; a model it does not help (measure with
    # `razor-vllm eval --sweep compensation`) can switch it off here.
    compensation: bool = True
    scores: dict[str, list[list[float]]] = Field(default_factory=dict)
    provenance: Provenance

    @field_validator("retrieval_heads")
    @classmethod
    def _sorted_unique(cls, value: list[list[int]]) -> list[list[int]]:
        for layer, heads in enumerate(value):
            if list(heads) != sorted(set(heads)):
                raise ValueError(f"layer {layer}: head ids must be sorted and unique, got {heads}")
        return value

    @model_validator(mode="after")
    def _shapes_match_model(self) -> "RazorProfile":
        n_layers, n_kv = self.model.num_layers, self.model.num_kv_heads
        if len(self.retrieval_heads) != n_layers:
            raise ValueError(f"retrieval_heads has {len(self.retrieval_heads)} layers, model.num_layers is {n_layers}")
        for layer, heads in enumerate(self.retrieval_heads):
            bad = [h for h in heads if not 0 <= h < n_kv]
            if bad:
                raise ValueError(f"retrieval_heads layer {layer}: ids {bad} outside [0, {n_kv})")
        for name, table in self.scores.items():
            if len(table) != n_layers or any(len(row) != n_kv for row in table):
                raise ValueError(f"scores.{name} must be {n_layers} layers x {n_kv} KV heads")
        return self

    # -- derived views -------------------------------------------------------------------

    @property
    def num_retrieval_heads(self) -> int:
        return sum(len(h) for h in self.retrieval_heads)

    @property
    def total_kv_heads(self) -> int:
        return self.model.num_layers * self.model.num_kv_heads

    @property
    def retrieval_share(self) -> float:
        return self.num_retrieval_heads / self.total_kv_heads

    def is_retrieval_mask(self) -> list[list[bool]]:
        """[layer][kv_head] -> True for retrieval heads."""
        n_kv = self.model.num_kv_heads
        return [[h in set(heads) for h in range(n_kv)] for heads in self.retrieval_heads]

    def summary(self) -> str:
        per_layer = " ".join(str(len(h)) for h in self.retrieval_heads)
        return (
            f"{self.num_retrieval_heads}/{self.total_kv_heads} KV heads retrieval "
            f"({100 * self.retrieval_share:.1f}%), sink={self.sink}, window={self.window}; "
            f"per layer: {per_layer}"
        )

    # -- I/O -------------------------------------------------------------------------------

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if data["provenance"]["note"] is None:  # files written before the field existed stay as they are
            del data["provenance"]["note"]
        return yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> "RazorProfile":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ProfileError(f"profile {source}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ProfileError(f"profile {source}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ProfileError(f"profile {source}: {_describe(exc)}") from exc

    @classmethod
    def load(cls, path: str | Path) -> "RazorProfile":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile {path}: no such file")
        return cls.from_yaml(path.read_text(encoding="utf-8"), source=str(path))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(
            f"field '{loc}': {msg}"
            + (f" (got {err['input']!r})" if err["type"] != "value_error" and _short(err.get("input")) else "")
        )
    return "; ".join(parts)


def _short(value: Any) -> bool:
    return value is not None and len(repr(value)) <= 80


class _ProfileDumper(yaml.SafeDumper):
    """Block style for mappings, flow style for the innermost lists (one line per layer)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, (list, dict)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)
_ProfileDumper.add_representer(tuple, _represent_list)


# -- finding profiles ------------------------------------------------------------------------


def bundled_profiles_dir() -> Path:
    """The configs/ folder: the source tree's when installed editable, else the packaged copy."""
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    if source_tree.is_dir():
        return source_tree
    return Path(str(resources.files("razor_vllm.configs")))


def resolve_profile(spec: str | Path) -> RazorProfile:
    """A profile from a path, or from a bundled name such as ``smollm2-135m-instruct``."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return RazorProfile.load(path)
    candidate = bundled_profiles_dir() / f"{spec}.yaml"
    if candidate.is_file():
        return RazorProfile.load(candidate)
    names = sorted(p.stem for p in bundled_profiles_dir().glob("*.yaml"))
    raise ProfileError(
        f"profile '{spec}': not a file and not a bundled profile (bundled: {', '.join(names) or 'none'})"
    )


def bundled_profile_paths(search_dir: Optional[Path] = None) -> list[Path]:
    return sorted(Path(search_dir or bundled_profiles_dir()).glob("*.yaml"))


def _names_match(profile: RazorProfile, name_hint: Optional[str]) -> bool:
    if not name_hint:
        return False
    hint = str(name_hint).rstrip("/").lower()
    return any(hint == n.lower() or hint.endswith("/" + n.lower().split("/")[-1]) for n in profile.model_names)


def find_profile_for(
    served: ModelFingerprint, search_dir: Optional[Path] = None, name_hint: Optional[str] = None
) -> RazorProfile:
    """The bundled profile *of* the served model; refuses with the nearest differences.

    A profile fits when its shape fields equal the model's and so do the identity fields it names
    (context length, RoPE scaling), so Llama-3.1-8B-Instruct's profile is not applied to Llama-3-8B-
    Instruct or to Gradient's 1M-context Llama-3. Among several fits: the one whose ``model_names``
    match ``name_hint`` (the served model's id or path), then the most specific fingerprint, then
    the file name. The bundled set holds one profile per fingerprint (tests/unit/test_bundled_profiles.py).
    """
    search_dir = Path(search_dir or bundled_profiles_dir())
    fits: list[tuple[tuple[int, int, str], RazorProfile]] = []
    nearest: list[tuple[int, str, list[str]]] = []
    for path in bundled_profile_paths(search_dir):
        profile = RazorProfile.load(path)
        diffs = profile.model.mismatches(served, identity=True)
        if not diffs:
            key = (-int(_names_match(profile, name_hint)), -profile.model.identity_fields, path.name)
            fits.append((key, profile))
        else:
            nearest.append((len(diffs), path.name, diffs))
    if fits:
        return min(fits, key=lambda item: item[0])[1]
    detail = ""
    if nearest:
        _, name, diffs = min(nearest)
        detail = f"; nearest is {name}: " + ", ".join(diffs)
    raise ProfileError(
        f"no head profile in {search_dir} matches the served model "
        f"({served.architecture}, {served.num_layers} layers, {served.num_kv_heads} KV heads, "
        f"head size {served.head_size}, vocab {served.vocab_size}, context {served.context_length}, "
        f"RoPE {served.rope_scaling}){detail}. "
        "Produce one with `razor-vllm profile --model DIR` and pass it with "
        '--additional-config \'{"razor": {"profile": PATH}}\''
    )


def check_profile_matches(profile: RazorProfile, served: ModelFingerprint, source: str = "profile") -> None:
    diffs = profile.model.mismatches(served)
    if diffs:
        raise ProfileError(f"{source} does not match the served model: " + "; ".join(diffs))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
