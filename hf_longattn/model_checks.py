"""Before any work: the model named exists (a local folder, a .gguf file, the alias or on the Hub) and takes windows of W tokens."""

from __future__ import annotations

import os

from .model_loading import ModelSource, load_config, resolve_model, resolve_source


HUB_TIMEOUT = 10.0
"""Seconds the one Hub look-up of `check_model` may take (no retries: a wrong name fails at once)."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _not_local(model: str) -> str:
    """``"model 'x' is not a local folder, a .gguf file or the alias 'smollm2' (did you mean 'smollm2'?)"``."""
    import difflib

    from .config import DEMO_MODEL

    close = difflib.get_close_matches(str(model).lower(), [DEMO_MODEL], n=1, cutoff=0.6)
    hint = f" (did you mean {DEMO_MODEL!r}?)" if close else ""
    return f"model {model!r} is not a local folder, a .gguf file or the alias {DEMO_MODEL!r}{hint}"


def _hub_offline() -> bool:
    """Whether Hub requests are off: huggingface_hub's flag, or ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` now."""
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    now = any((os.environ.get(name) or "").upper() in constants.ENV_VARS_TRUE_VALUES for name in names)
    return constants.is_offline_mode() or now


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures (no answer from the Hub) of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            found += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _hub_cache_dir() -> str:
    """The Hub cache folder, from the environment as it is now (same precedence as ``huggingface_hub.constants``)."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expandvars(os.path.expanduser(os.environ[name]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])), "hub")
    return constants.HF_HUB_CACHE


def check_model(model: str, revision: str | None = None) -> ModelSource:
    """Resolve ``model`` and make sure it exists, before any work: one line of what is wrong, and what to do.

    The alias ``"smollm2"`` becomes its GGUF file (`resolve_model`); a local folder or ``.gguf`` file
    is accepted as is, with no network call. A Hub repo id is checked: with ``HF_HUB_OFFLINE=1`` its
    ``config.json`` must be in the local Hub cache; otherwise one request (``HfApi.model_info``, a
    `HUB_TIMEOUT` of 10 s, no retries) must find it. No token is ever logged or put in a message.

    Args:
        model (`str`): a Hub repo id, a local model folder, a local ``.gguf`` file or ``"smollm2"``.
        revision (`str`, *optional*): Hub revision (branch, tag or commit hash).

    Returns:
        `ModelSource`: where the model comes from (as `resolve_source` classifies it).

    Raises:
        `LongAttnError`: a path that does not exist, a file that is not ``.gguf``, an invalid repo id,
            offline with no cached copy, the Hub unreachable, no such repo or revision, a gated repo
            (accept its license, then ``hf auth login``), or a Hub repo without ``config.json``.

    Example:

    >>> check_model("smolm2")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    hf_longattn.errors.LongAttnError: model 'smolm2' is not a local folder, a .gguf file or the alias 'smollm2' (did you mean 'smollm2'?), and hf_longattn cannot reach the Hub to look up 'smolm2' (ConnectError: [Errno -2] Name or service not known): check the network or pass a local path/.gguf file
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .errors import LongAttnError

    try:
        source = resolve_source(resolve_model(model), revision)
    except FileNotFoundError as error:
        raise LongAttnError(f"{_one_line(error)}: pass an existing model folder or .gguf file, a Hub repo id or "
                            f"'smollm2'") from error
    except ValueError as error:
        raise LongAttnError(_one_line(error)) from error
    if source.kind != "hub":
        return source
    try:
        validate_repo_id(source.location)
    except HFValidationError as error:
        raise LongAttnError(f"{_not_local(model)}, nor a valid Hub repo id ({_one_line(error)})") from error
    if _hub_offline():
        _check_cached(model, source)
    else:
        _check_on_hub(model, source)
    return source


def _check_cached(model: str, source: ModelSource) -> None:
    """Offline: the repo's ``config.json`` (at ``revision``, default ``main``) must be in the Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    from .errors import LongAttnError

    cache = _hub_cache_dir()
    cached = try_to_load_from_cache(source.location, "config.json", cache_dir=cache, revision=source.revision)
    if isinstance(cached, str):
        return
    at = f" at revision {source.revision!r}" if source.revision else ""
    raise LongAttnError(
        f"{_not_local(model)}, and HF_HUB_OFFLINE is set while the Hub cache ({cache}) holds no copy of "
        f"{source.location!r}{at}: download it once online (`hf download {source.location}`), unset "
        f"HF_HUB_OFFLINE, or pass a local path/.gguf file"
    )


def _check_on_hub(model: str, source: ModelSource) -> None:
    """Online: one ``model_info`` request (no retries) must find the repo (and revision), with a ``config.json``."""
    from huggingface_hub import HfApi

    from .errors import LongAttnError

    try:
        info = HfApi().model_info(source.location, revision=source.revision, timeout=HUB_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - every Hub or network failure becomes one clear line
        clear = _hub_error(model, source, error)
        if clear is error:
            raise
        raise clear from error
    files = [sibling.rfilename for sibling in getattr(info, "siblings", None) or []]
    if files and "config.json" not in files:
        ggufs = [name for name in files if name.endswith(".gguf")]
        hint = (f"download one of its .gguf files (e.g. {ggufs[0]}) and pass its path" if ggufs
                else "pass a model folder or a .gguf file")
        raise LongAttnError(f"the Hub repo {source.location!r} has no config.json, so it cannot be loaded by id: "
                            f"{hint}")


def _hub_error(model: str, source: ModelSource, error: Exception) -> Exception:
    """The `LongAttnError` for a failed ``model_info`` request (``error`` itself when it is not about the Hub)."""
    from huggingface_hub import errors as hub

    from .errors import LongAttnError

    repo = source.location
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, hub.GatedRepoError):
        return LongAttnError(f"model {repo!r} is a gated Hub repo you have no access to: accept its license at "
                             f"https://huggingface.co/{repo}, then log in with `hf auth login`")
    if isinstance(error, hub.RepositoryNotFoundError):
        return LongAttnError(f"{_not_local(model)}, and the Hub has no model repo {repo!r} (HTTP {status or 404}; "
                             f"if it is private, log in with `hf auth login`)")
    if isinstance(error, hub.RevisionNotFoundError):
        return LongAttnError(f"the Hub repo {repo!r} has no revision {source.revision or 'main'!r}: "
                             f"set `revision` to one of its branches, tags or commit hashes")
    if isinstance(error, hub.DisabledRepoError):
        return LongAttnError(f"the Hub repo {repo!r} is disabled: pick another model")
    if isinstance(error, hub.HFValidationError):
        return LongAttnError(f"{_not_local(model)}, nor a valid Hub repo id ({_one_line(error)})")
    if isinstance(error, hub.HfHubHTTPError):
        return LongAttnError(f"the Hub answered HTTP {status} when looking up {repo!r} ({_one_line(error)}): "
                             f"try again later, or pass a local path/.gguf file")
    if isinstance(error, _transport_errors()):
        return LongAttnError(f"{_not_local(model)}, and hf_longattn cannot reach the Hub to look up {repo!r} "
                             f"({type(error).__name__}: {_one_line(error)}): check the network or pass a local "
                             f"path/.gguf file")
    return error


_EXTENDING_ROPE_TYPES = ("yarn", "longrope", "llama3")
"""RoPE types whose ``factor`` × ``original_max_position_embeddings`` is the context the model was adapted to."""


def model_context(config) -> int:
    """The longest input, in tokens, a model is trusted with, from its config alone.

    ``max_position_embeddings`` (of the text config for a multimodal model; ``n_positions``,
    ``max_sequence_length``, ``seq_length`` or ``max_seq_len`` when it has none), raised to
    ``factor × original_max_position_embeddings`` when ``rope_parameters`` (transformers 5; the
    older ``rope_scaling`` is read too, per layer type when nested) has a ``yarn``, ``longrope`` or
    ``llama3`` rope type: those were adapted to that length, and some configs (Qwen2.5/Qwen3 with
    YaRN) keep the pre-scaling ``max_position_embeddings``. ``linear`` and ``dynamic`` scaling are
    not counted (dynamic NTK stretches at inference without training; ``linear`` configs disagree on
    whether ``max_position_embeddings`` includes the factor): set ``context_length`` for those.

    Args:
        config (`PretrainedConfig`): the model's config (`load_config`).

    Returns:
        `int`: the context in tokens.

    Raises:
        `LongAttnError`: the config states no context length (set ``context_length`` in the run config).

    Example:

    >>> from transformers import Qwen2Config
    >>> model_context(Qwen2Config(max_position_embeddings=32768))
    32768
    >>> model_context(Qwen2Config(max_position_embeddings=32768, rope_scaling={
    ...     "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
    131072
    """
    from .errors import LongAttnError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")
    found = next((getattr(text, name) for name in names if isinstance(getattr(text, name, None), int)), None)
    if found is None:
        raise LongAttnError(f"the {type(config).__name__} states no context length (max_position_embeddings): "
                            f"set context_length in the run config (--set context_length=N)")
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] if isinstance(params, dict) else []
    context = int(found)
    for p in nested or ([params] if isinstance(params, dict) else []):
        factor, original = p.get("factor"), p.get("original_max_position_embeddings")
        if (p.get("rope_type") or p.get("type")) in _EXTENDING_ROPE_TYPES and factor and original:
            context = max(context, int(float(factor) * int(original)))
    return context


def check_window_fits(config, source: ModelSource | None = None) -> None:
    """Refuse, before any work, windows longer than the scoring model is trusted with.

    The limit is ``config.context_length`` when set, else `model_context` of the model's config
    (only the config is read: ``config.json``, or a GGUF file's metadata in about a second).

    Args:
        config (`RunConfig`): the run's configuration (``model``, ``revision``, ``window_size``, ``context_length``).
        source (`ModelSource`, *optional*): the model, already checked; by default `check_model` finds it.

    Raises:
        `LongAttnError`: ``window_size`` exceeds the limit (the message gives both numbers and what
            to do), or the model's config cannot be read.

    Example:

    >>> check_window_fits(RunConfig.demo(window_size=200_000))  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    hf_longattn.errors.LongAttnError: window_size 200000 exceeds the context of model 'smollm2' (8192 tokens, ...
    """
    from .errors import LongAttnError

    window = config.window_size
    if config.context_length is not None:
        if window > config.context_length:
            raise LongAttnError(f"window_size {window} exceeds context_length {config.context_length}: lower "
                                f"--window-size to at most {config.context_length}, or raise context_length if "
                                f"model {config.model!r} really handles {window} tokens")
        return
    source = source or check_model(config.model, config.revision)
    try:
        context = model_context(load_config(source))
    except (OSError, ValueError) as error:
        raise LongAttnError(f"cannot read the config of model {config.model!r}: {_one_line(error)}") from error
    if window > context:
        raise LongAttnError(
            f"window_size {window} exceeds the context of model {config.model!r} ({context} tokens, from its config): "
            f"windows that long are scored at positions the model never saw; lower --window-size to at most "
            f"{context}, or, for a rope-scaled model whose config understates its context, --set context_length=N"
        )
