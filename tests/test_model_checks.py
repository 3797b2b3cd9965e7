"""Tests of hf_longattn.model_checks: a wrong model name fails at once in one line; windows beyond the context are refused."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from hf_longattn.config import RunConfig
from hf_longattn.errors import LongAttnError
from hf_longattn.model_checks import check_model, check_window_fits, model_context
from hf_longattn.model_loading import resolve_source
from hf_longattn.scorer import LongAttnScorer


# --- check_model: a wrong name fails at once, in one line, saying why and what to do ----------------------


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Record every ``HfApi.model_info`` call; ``hub_calls.answer`` is what it raises (or returns). Runs in ``tmp_path``."""
    import huggingface_hub

    class Calls(list):
        answer: object = None

    calls = Calls()

    def model_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if isinstance(calls.answer, BaseException):
            raise calls.answer
        return calls.answer

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.chdir(tmp_path)  # no stray local folder named like the model
    return calls


@pytest.fixture
def hub_online(monkeypatch):
    """Online mode, whatever the environment running the tests says."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """``HF_HOME`` and ``HF_HUB_CACHE`` pointing at empty folders under ``tmp_path``; returns the hub cache."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _http_error(cls, status: int, repo: str = "smolm2"):
    """A huggingface_hub HTTP error as ``hf_raise_for_status`` builds it, with a real response object."""
    import httpx2

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo}")
    return cls(f"{status} Client Error. (Request ID: x)\n\nfor url: {request.url}",
               response=httpx2.Response(status, request=request))


def test_mistyped_name_with_the_hub_unreachable_fails_at_once(hub_calls, hub_online):
    import httpx2

    hub_calls.answer = httpx2.ConnectError("[Errno -2] Name or service not known")
    start = time.monotonic()
    with pytest.raises(LongAttnError) as caught:
        check_model("smolm2")
    assert time.monotonic() - start < 1.0
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model 'smolm2' is not a local folder, a .gguf file or the alias 'smollm2'")
    assert "did you mean 'smollm2'?" in message
    assert "cannot reach the Hub to look up 'smolm2' (ConnectError: [Errno -2] Name or service not known)" in message
    assert "check the network or pass a local path/.gguf file" in message
    assert hub_calls == [("smolm2", {"revision": None, "timeout": 10.0})]  # one request, short timeout, no retries


def test_unreachable_hub_end_to_end_without_mocks(monkeypatch, hub_online, tmp_path):
    """The real client against a closed local port: huggingface_hub's own exception, turned into one line, at once."""
    from huggingface_hub import constants

    if any(name.lower().endswith("_proxy") for name in os.environ):
        pytest.skip("a proxy is configured: requests would not go to the closed port")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(LongAttnError, match=r"cannot reach the Hub to look up 'smolm2' \(ConnectError: .*\): check "):
        check_model("smolm2")
    assert time.monotonic() - start < 5.0


def test_offline_without_a_cached_copy_says_so(monkeypatch, hub_calls, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongAttnError) as caught:
        check_model("smolm2")
    message = str(caught.value)
    assert "\n" not in message and "did you mean 'smollm2'?" in message
    assert f"HF_HUB_OFFLINE is set while the Hub cache ({empty_hub_cache}) holds no copy of 'smolm2'" in message
    assert "`hf download smolm2`" in message and "unset HF_HUB_OFFLINE" in message
    assert hub_calls == []  # offline: no request at all


def test_offline_with_a_cached_copy_passes(monkeypatch, hub_calls, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hub_cache / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    assert check_model("some-org/some-model").kind == "hub"
    with pytest.raises(LongAttnError, match=r"no copy of 'some-org/some-model' at revision 'v2'"):
        check_model("some-org/some-model", revision="v2")
    assert hub_calls == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (("RepositoryNotFoundError", 404), r"^model 'smolm2' is not a local folder, a \.gguf file or the alias "
                                          r"'smollm2' \(did you mean 'smollm2'\?\), and the Hub has no model repo "
                                          r"'smolm2' \(HTTP 404; if it is private, log in with `hf auth login`\)$"),
        (("GatedRepoError", 403), r"^model 'smolm2' is a gated Hub repo you have no access to: accept its license at "
                                  r"https://huggingface.co/smolm2, then log in with `hf auth login`$"),
        (("RevisionNotFoundError", 404), r"^the Hub repo 'smolm2' has no revision 'main': set `revision`"),
        (("HfHubHTTPError", 503), r"^the Hub answered HTTP 503 when looking up 'smolm2' \(503 Client Error\. .*\): try "),
    ],
)
def test_hub_answers_become_one_clear_line(hub_calls, hub_online, error, message):
    from huggingface_hub import errors

    name, status = error
    hub_calls.answer = _http_error(getattr(errors, name), status)
    with pytest.raises(LongAttnError, match=message) as caught:
        check_model("smolm2")
    assert "\n" not in str(caught.value) and len(hub_calls) == 1


def test_an_unexpected_error_is_not_disguised(hub_calls, hub_online):
    hub_calls.answer = KeyError("siblings")
    with pytest.raises(KeyError):
        check_model("org/m")


def test_invalid_repo_id_and_missing_paths_need_no_request(hub_calls, hub_online, tmp_path):
    with pytest.raises(LongAttnError, match=r"^model 'a b' is not a local folder.*, nor a valid Hub repo id \(Repo id"):
        check_model("a b")
    with pytest.raises(LongAttnError, match=r"model path ./missing/model does not exist .*: pass an existing"):
        check_model("./missing/model")
    with pytest.raises(LongAttnError, match=r"missing\.gguf does not exist"):
        check_model("missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LongAttnError, match=r"is a file but not a \.gguf file"):
        check_model(str(tmp_path / "weights.bin"))
    assert hub_calls == []


def test_hub_repo_without_config_json_is_refused(hub_calls, hub_online):
    from huggingface_hub.hf_api import ModelInfo

    hub_calls.answer = ModelInfo(id="org/m-GGUF", siblings=[{"rfilename": "m.Q4_0.gguf"}, {"rfilename": "README.md"}])
    with pytest.raises(LongAttnError, match=r"has no config.json.*download one of its \.gguf files \(e\.g\. m\.Q4_0"):
        check_model("org/m-GGUF")
    hub_calls.answer = ModelInfo(id="org/m", siblings=[{"rfilename": "config.json"}])
    assert check_model("org/m", revision="abc") == resolve_source("org/m", "abc")
    assert hub_calls[-1] == ("org/m", {"revision": "abc", "timeout": 10.0})


def test_local_folder_gguf_file_and_alias_need_no_request(hub_calls, hub_online, tiny_model_dir, tmp_path,
                                                          smollm2_gguf):
    folder = tiny_model_dir("llama")
    assert check_model(str(folder)) == resolve_source(str(folder))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")  # only classified, never parsed
    assert check_model(str(gguf)) == resolve_source(str(gguf))
    assert check_model("smollm2") == resolve_source(str(smollm2_gguf))
    assert check_model("SmolLM2").gguf_file == smollm2_gguf.name
    assert hub_calls == []


# --- the model's context and check_window_fits -----------------------------------------------------------


def test_model_context_reads_max_positions_and_context_extending_rope():
    from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

    assert model_context(Qwen2Config(max_position_embeddings=32768)) == 32768
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert model_context(Qwen2Config(max_position_embeddings=32768, rope_scaling=yarn)) == 131072  # Qwen2.5 + YaRN
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert model_context(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3)) == 131072  # Llama-3.1
    linear = {"type": "linear", "factor": 4.0}  # not counted: set context_length for such a model
    assert model_context(LlamaConfig(max_position_embeddings=4096, rope_scaling=linear)) == 4096
    with pytest.raises(LongAttnError, match=r"states no context length .*--set context_length=N"):
        model_context(PretrainedConfig())


def _run_config(model, **values) -> RunConfig:
    return RunConfig.from_dict({"model": str(model), "sources": ["docs/"], **values})


def test_window_longer_than_the_context_is_refused(tiny_model_dir):
    folder = tiny_model_dir("llama")  # max_position_embeddings=1024
    check_window_fits(_run_config(folder, window_size=1024))
    with pytest.raises(LongAttnError) as caught:
        check_window_fits(_run_config(folder, window_size=2048))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"window_size 2048 exceeds the context of model '{folder}' (1024 tokens, from its config)")
    assert "lower --window-size to at most 1024" in message and "--set context_length=N" in message


def test_context_length_overrides_the_models_context(tiny_model_dir):
    folder = tiny_model_dir("llama")
    check_window_fits(_run_config(folder, window_size=2048, context_length=4096))
    with pytest.raises(LongAttnError, match=r"^window_size 2048 exceeds context_length 1500: lower --window-size"):
        check_window_fits(_run_config(folder, window_size=2048, context_length=1500))


def test_window_check_gives_the_model_check_message(hub_calls, hub_online):
    import httpx2

    hub_calls.answer = httpx2.ConnectError("[Errno -2] Name or service not known")
    with pytest.raises(LongAttnError, match=r"did you mean 'smollm2'\?.*cannot reach the Hub"):
        check_window_fits(_run_config("smolm2", window_size=4096))


@pytest.mark.smollm2
def test_smollm2_window_beyond_8192_is_refused(smollm2_gguf, hub_calls):
    check_window_fits(RunConfig.demo())  # window_size 8192: fits exactly
    with pytest.raises(LongAttnError, match=r"^window_size 200000 exceeds the context of model 'smollm2' \(8192 tokens"):
        check_window_fits(RunConfig.demo(window_size=200_000))
    check_window_fits(RunConfig.demo(window_size=16384, context_length=16384))
    assert hub_calls == []


def test_scorer_warns_once_per_process_beyond_the_context(tiny_model_dir, monkeypatch, caplog):
    import hf_longattn.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "_CONTEXT_WARNED", set())
    caplog.set_level(logging.WARNING, logger="hf_longattn")
    folder = str(tiny_model_dir("llama"))
    for _ in range(2):  # two scorers (as after pickling into the same process): one warning
        LongAttnScorer(folder, max_length=2048).load()
    LongAttnScorer(folder, max_length=1024).load()  # within the context: no warning
    warnings = [r.getMessage() for r in caplog.records if "exceeds the model's context" in r.getMessage()]
    assert warnings == ["hf_longattn: max_length=2048 exceeds the model's context (1024 tokens, from its config): "
                        "windows longer than that are scored at positions the model never saw, so their attention "
                        "means little"]
