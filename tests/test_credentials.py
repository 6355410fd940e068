"""Missing credentials stop the command before any call, for every provider family (issue 24): a key variable
set to nothing counts as unset; Azure needs a key or Azure AD and its endpoint; Bedrock and Vertex AI are
asked through their SDK's own chain (boto3, google-auth), and a missing SDK names the package to install.
A failed import and refused credentials are sent once, never retried as if they might pass.

No test reaches a cloud: boto3 reads credential files written here (its instance-metadata link is switched
off), google-auth is replaced by a stand-in whose ``default()`` answers as scripted, and "not installed" is
an import made to fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from mics_agents import ConfigError, ModelCallError
from mics_agents.models import ChatMessage, ModelRequest
from mics_agents.models.litellm_model import LiteLLMTransport
from mics_agents.models.providers import check_credentials, import_litellm, load_router, missing_credentials
from mics_agents.models.retrying import RetryingModel
from mics_agents.models.transport import Transport

from .openai_server import OpenAIServer

pytestmark = pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

BEDROCK = "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0"
VERTEX = "vertex_ai/gemini-1.5-pro"
AZURE = "azure/gpt-4o"
CLOUD_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCLOUD", "CLOUDSDK_", "VERTEXAI_", "VERTEX_AI_")
OTHER_CREDENTIALS = ("ANTHROPIC_AUTH_TOKEN", "FIREWORKS_AI_TOKEN", "DATAROBOT_API_TOKEN")


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch, tmp_path):
    """None of the machine's cloud credentials, files or metadata server: what a test sets is all there is."""
    for name in list(os.environ):
        if name.startswith(CLOUD_PREFIXES) or name in OTHER_CREDENTIALS:
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws" / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws" / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google-auth, where installed, never asks a metadata server


def refused(names: list[str], router=None) -> str:
    with pytest.raises(ConfigError) as caught:
        check_credentials(names, router)
    return " ".join(str(caught.value).split())


def write_aws_credentials(tmp_path: Path, text: str) -> None:
    (tmp_path / "aws").mkdir(exist_ok=True)
    (tmp_path / "aws" / "credentials").write_text(text)


def router_of(tmp_path: Path, *deployments: dict):
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"model_list": list(deployments)}))
    return load_router(config)


# -- key variables: empty counts as unset ----------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_an_openai_key_set_to_nothing_is_missing(monkeypatch, blank):
    monkeypatch.setenv("OPENAI_API_KEY", blank)
    message = refused(["openai/gpt-4o"])
    assert "openai/gpt-4o needs OPENAI_API_KEY, which is set to nothing" in message
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-looking-key-0001")
    check_credentials(["openai/gpt-4o"])


def test_openais_own_api_as_the_base_url_still_needs_the_key(monkeypatch):
    """A base URL means "a server of one's own, which may need no key", except OpenAI's own API."""
    monkeypatch.setenv("OPENAI_API_BASE", "https://api.openai.com/v1")
    assert "openai/gpt-4o needs OPENAI_API_KEY, which is not set" in refused(["openai/gpt-4o"])
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:8000/v1")
    check_credentials(["openai/gpt-4o"])


@pytest.mark.parametrize(("variable", "base", "model", "key"), [
    ("OPENAI_API_BASE", "https://API.OPENAI.COM/v1", "openai/gpt-4o", "OPENAI_API_KEY"),  # any spelling of its host
    ("OPENAI_API_BASE", "api.openai.com", "openai/gpt-4o", "OPENAI_API_KEY"),
    ("ANTHROPIC_API_BASE", "https://api.anthropic.com", "anthropic/claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
    ("ANTHROPIC_API_BASE", "   ", "anthropic/claude-sonnet-4-5", "ANTHROPIC_API_KEY"),  # blank is unset
    ("DEEPSEEK_API_BASE", "https://api.deepseek.com/v1", "deepseek/deepseek-chat", "DEEPSEEK_API_KEY"),
])
def test_a_providers_own_public_api_as_the_base_url_still_needs_its_key(monkeypatch, variable, base, model, key):
    monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(variable, base)
    assert key in refused([model])


def test_a_lookalike_host_is_a_server_of_ones_own(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_BASE", "https://api.openai.com.my-proxy.internal/v1")
    check_credentials(["openai/gpt-4o"])


def test_anthropic_needs_its_key_or_auth_token(monkeypatch):
    assert "anthropic/claude-sonnet-4-5 needs ANTHROPIC_API_KEY, which is not set" in refused(
        ["anthropic/claude-sonnet-4-5"]
    )
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    message = refused(["anthropic/claude-sonnet-4-5"])
    assert "ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN, and ANTHROPIC_API_KEY is set to nothing" in message
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "sk-ant-token-0002")
    check_credentials(["anthropic/claude-sonnet-4-5"])
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-key-0003")
    check_credentials(["anthropic/claude-sonnet-4-5"])


def test_gemini_takes_either_of_its_two_key_variables(monkeypatch):
    message = refused(["gemini/gemini-2.0-flash"])
    assert "gemini/gemini-2.0-flash needs" in message and "GEMINI_API_KEY" in message and "GOOGLE_API_KEY" in message
    monkeypatch.setenv("GEMINI_API_KEY", " ")
    assert "GEMINI_API_KEY is set to nothing" in refused(["gemini/gemini-2.0-flash"])
    monkeypatch.setenv("GOOGLE_API_KEY", "AIza-real-looking-0004")
    check_credentials(["gemini/gemini-2.0-flash"])


def test_a_provider_reached_by_its_default_variable_counts_an_empty_one_as_unset(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "")
    assert "deepseek/deepseek-chat needs DEEPSEEK_API_KEY, which is set to nothing" in refused(["deepseek/deepseek-chat"])
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-deepseek-0005")
    check_credentials(["deepseek/deepseek-chat"])


def test_a_router_key_reference_to_an_empty_variable_or_a_blank_key_is_missing(monkeypatch, tmp_path):
    router = router_of(
        tmp_path,
        {"model_name": "by-reference", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/POOL_KEY"}},
        {"model_name": "blank", "litellm_params": {"model": "openai/gpt-4o", "api_key": "  "}},
        {"model_name": "written", "litellm_params": {"model": "openai/gpt-4o", "api_key": "sk-in-the-file-0006"}},
    )
    monkeypatch.setenv("POOL_KEY", "")
    assert "by-reference needs POOL_KEY, which is set to nothing" in refused(["by-reference"], router)
    assert "blank needs OPENAI_API_KEY, which is not set" in refused(["blank"], router)
    check_credentials(["written"], router)
    monkeypatch.setenv("POOL_KEY", "sk-pool-0007")
    check_credentials(["by-reference"], router)


def test_every_model_that_lacks_something_is_named_at_once(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    message = refused(["openai/gpt-4o", AZURE, "hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct", BEDROCK])
    assert message.startswith("Missing credentials: ")
    assert "openai/gpt-4o needs" in message and f"{AZURE} needs" in message and f"{BEDROCK} needs" in message
    assert "hosted_vllm" not in message and "Set what is missing in the environment or in" in message
    assert "*_API_BASE" in message  # a key variable is among them: a server of one's own may need none


# -- Azure: a key or Azure AD, and the resource's endpoint -----------------------------------------------


def test_azure_with_its_endpoint_but_no_key_is_refused(monkeypatch):
    """The endpoint of one's own that excuses an OpenAI-compatible server from a key does not excuse Azure."""
    monkeypatch.setenv("AZURE_API_BASE", "https://example-resource.openai.azure.com")
    message = refused([AZURE])
    assert f"{AZURE} needs a key (AZURE_API_KEY or AZURE_OPENAI_API_KEY)" in message and "AZURE_AD_TOKEN" in message
    assert f"{AZURE} needs AZURE_API_BASE" not in message
    monkeypatch.setenv("AZURE_API_KEY", "")
    assert f"{AZURE} needs a key" in refused([AZURE])


@pytest.mark.parametrize("credentials", [
    {"AZURE_API_KEY": "azure-key-0008"},
    {"AZURE_OPENAI_API_KEY": "azure-key-0009"},
    {"AZURE_AD_TOKEN": "eyJ-ad-token-0010"},
    {"AZURE_CLIENT_ID": "client", "AZURE_CLIENT_SECRET": "secret-0011", "AZURE_TENANT_ID": "tenant"},
    {"AZURE_CLIENT_ID": "client", "AZURE_USERNAME": "user@example.org", "AZURE_PASSWORD": "pw-0012"},
])
def test_azure_accepts_a_key_or_any_azure_ad_setting_litellm_reads(monkeypatch, credentials):
    monkeypatch.setenv("AZURE_API_BASE", "https://example-resource.openai.azure.com")
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    check_credentials([AZURE])


def test_an_incomplete_service_principal_is_not_azure_ad(monkeypatch):
    monkeypatch.setenv("AZURE_API_BASE", "https://example-resource.openai.azure.com")
    monkeypatch.setenv("AZURE_CLIENT_ID", "client")
    monkeypatch.setenv("AZURE_TENANT_ID", "tenant")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", " ")
    assert f"{AZURE} needs a key" in refused([AZURE])


def test_azure_without_its_endpoint_is_refused_even_with_a_key(monkeypatch):
    monkeypatch.setenv("AZURE_API_KEY", "azure-key-0013")
    message = refused([AZURE])
    assert f"{AZURE} needs AZURE_API_BASE" in message and "needs a key" not in message


def test_azure_deployments_in_a_router_bring_their_own_key_or_service_principal(tmp_path):
    base = "https://example-resource.openai.azure.com"
    router = router_of(
        tmp_path,
        {"model_name": "keyed", "litellm_params": {"model": AZURE, "api_base": base, "api_key": "azure-key-0014"}},
        {"model_name": "principal", "litellm_params": {
            "model": AZURE, "api_base": base, "tenant_id": "t", "client_id": "c", "client_secret": "s-0015"}},
        {"model_name": "bare", "litellm_params": {"model": AZURE, "api_base": base}},
    )
    check_credentials(["keyed", "principal"], router)
    assert "bare needs a key" in refused(["bare"], router)


# -- Bedrock: boto3's own chain --------------------------------------------------------------------------


def test_bedrock_with_no_aws_credentials_anywhere_is_refused():
    message = refused([BEDROCK])
    assert f"{BEDROCK} needs AWS credentials and boto3 found none" in message
    assert "AWS_PROFILE" in message and "AWS_BEARER_TOKEN_BEDROCK" in message
    assert "*_API_BASE" not in message  # no endpoint of one's own excuses AWS


def test_bedrock_takes_the_default_profile_from_the_shared_credentials_file(tmp_path):
    write_aws_credentials(tmp_path, "[default]\naws_access_key_id = AKIAFILE0016\naws_secret_access_key = file-secret\n")
    check_credentials([BEDROCK, "sagemaker/my-endpoint"])


def test_bedrock_takes_a_named_profile_and_refuses_one_that_does_not_exist(monkeypatch, tmp_path):
    write_aws_credentials(tmp_path, "[research]\naws_access_key_id = AKIAPROF0017\naws_secret_access_key = s\n")
    assert "boto3 found none" in refused([BEDROCK])  # the profile is not the default one
    monkeypatch.setenv("AWS_PROFILE", "research")
    check_credentials([BEDROCK])
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    message = refused([BEDROCK])
    assert "no-such-profile" in message and "could not be found" in message


@pytest.mark.parametrize("blank", ["", "  "])
def test_aws_keys_set_to_nothing_are_no_credentials(monkeypatch, blank):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", blank)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", blank)
    assert "boto3 found none" in refused([BEDROCK])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV00018")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-0018")
    check_credentials([BEDROCK])


def test_a_bedrock_api_key_needs_no_aws_credentials(monkeypatch):
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", " ")
    refused([BEDROCK])
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key-0019")
    check_credentials([BEDROCK])


def test_bedrock_deployments_in_a_router_bring_their_own_keys_or_profile(tmp_path):
    write_aws_credentials(tmp_path, "[team]\naws_access_key_id = AKIATEAM0020\naws_secret_access_key = s\n")
    router = router_of(
        tmp_path,
        {"model_name": "keyed", "litellm_params": {
            "model": BEDROCK, "aws_access_key_id": "AKIAYAML0021", "aws_secret_access_key": "yaml-secret"}},
        {"model_name": "profiled", "litellm_params": {"model": BEDROCK, "aws_profile_name": "team"}},
        {"model_name": "lost", "litellm_params": {"model": BEDROCK, "aws_profile_name": "gone"}},
        {"model_name": "half", "litellm_params": {"model": BEDROCK, "aws_access_key_id": "AKIAHALF0022"}},
    )
    check_credentials(["keyed", "profiled"], router)
    assert "lost needs AWS credentials" in refused(["lost"], router) and "gone" in refused(["lost"], router)
    assert "half needs AWS credentials and boto3 found none" in refused(["half"], router)


def test_bedrock_without_boto3_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # the import fails as if it were not installed
    message = refused([BEDROCK])
    assert f"{BEDROCK} needs the boto3 package, which is not installed" in message and "pip install boto3" in message
    assert ".env" not in message  # nothing to set: a package to install


# -- Vertex AI: google-auth's Application Default Credentials --------------------------------------------


@pytest.fixture
def fake_google(monkeypatch):
    """google.auth as a stand-in: ``default()`` answers with ``state.answer`` (or raises ``state.error``)
    and records each call, so no test depends on google-auth being installed or reaches Google."""
    state = SimpleNamespace(calls=[], answer=(object(), "project-from-adc"), error=None)
    exceptions = types.ModuleType("google.auth.exceptions")

    class GoogleAuthError(Exception):
        pass

    class DefaultCredentialsError(GoogleAuthError):
        pass

    exceptions.GoogleAuthError, exceptions.DefaultCredentialsError = GoogleAuthError, DefaultCredentialsError

    def default(scopes=None, **_):
        state.calls.append(scopes)
        if state.error is not None:
            raise state.error
        return state.answer

    auth = types.ModuleType("google.auth")
    auth.default, auth.exceptions, auth.__path__ = default, exceptions, []
    google = types.ModuleType("google")
    google.auth, google.__path__ = auth, []
    for name, module in (("google", google), ("google.auth", auth), ("google.auth.exceptions", exceptions)):
        monkeypatch.setitem(sys.modules, name, module)
    state.DefaultCredentialsError = DefaultCredentialsError
    return state


def test_vertex_uses_application_default_credentials_and_their_project(fake_google):
    check_credentials([VERTEX, "vertex_ai/gemini-2.0-flash"])
    assert fake_google.calls == [["https://www.googleapis.com/auth/cloud-platform"]]  # asked once for both


def test_vertex_with_no_google_credentials_is_refused(fake_google):
    fake_google.error = fake_google.DefaultCredentialsError("Your default credentials were not found.")
    message = refused([VERTEX])
    assert f"{VERTEX} needs Google credentials and google.auth found none" in message
    assert "Your default credentials were not found" in message and "gcloud auth application-default login" in message


def test_vertex_needs_a_project_when_the_credentials_name_none(monkeypatch, fake_google):
    fake_google.answer = (object(), None)
    assert f"{VERTEX} needs a Google Cloud project: set VERTEXAI_PROJECT" in refused([VERTEX])
    monkeypatch.setenv("VERTEXAI_PROJECT", "my-project")
    check_credentials([VERTEX])


def test_vertex_credentials_given_to_litellm_are_not_looked_up_again(monkeypatch, tmp_path, fake_google):
    monkeypatch.setenv("VERTEXAI_CREDENTIALS", str(tmp_path / "key.json"))
    check_credentials([VERTEX])
    router = router_of(tmp_path, {"model_name": "pinned", "litellm_params": {
        "model": VERTEX, "vertex_credentials": "os.environ/VERTEXAI_CREDENTIALS", "vertex_project": "p"}})
    check_credentials(["pinned"], router)
    assert fake_google.calls == []


@pytest.mark.parametrize("given", [False, True])
def test_vertex_without_google_auth_names_the_package_to_install(monkeypatch, tmp_path, given):
    monkeypatch.setitem(sys.modules, "google.auth", None)  # not installed (or made so): the import fails
    if given:
        monkeypatch.setenv("VERTEXAI_CREDENTIALS", str(tmp_path / "key.json"))  # LiteLLM still needs google-auth
    message = refused([VERTEX])
    assert f"{VERTEX} needs the google-auth package, which is not installed" in message
    assert "pip install google-auth" in message


def test_vertex_through_the_real_google_auth_reads_an_adc_file(monkeypatch, tmp_path):
    """The stand-in's contract checked against google-auth itself, where it is installed (an authorized-user
    file is read without any request)."""
    pytest.importorskip("google.auth", reason="google-auth is not installed here; the stand-in tests cover the rest")
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "id.apps.googleusercontent.com",
                               "client_secret": "secret-0023", "refresh_token": "refresh-0023"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("VERTEXAI_PROJECT", "my-project")
    check_credentials([VERTEX])
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    assert f"{VERTEX} needs Google credentials" in refused([VERTEX])


def test_missing_credentials_says_what_each_name_lacks_without_raising(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    assert missing_credentials("openai/gpt-4o") == ["OPENAI_API_KEY, which is set to nothing"]
    assert missing_credentials("hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct") == []


# -- never retried: a failed import, refused credentials -------------------------------------------------


class FailingTransport(Transport):
    """Raises ``errors[k]`` on attempt k (the last one again after that), counting attempts."""

    def __init__(self, *errors: BaseException) -> None:
        super().__init__("scripted/model", timeout=5.0)
        self.errors, self.attempts = list(errors), 0

    def endpoint_bases(self) -> list[str | None]:
        return ["http://127.0.0.1:9"]

    async def _send(self, request, timeout):
        self.attempts += 1
        raise self.errors[min(self.attempts, len(self.errors)) - 1]


def litellm_wrapping(wrapper: type, cause: BaseException, text: str | None = None) -> BaseException:
    """How LiteLLM reports a provider's failure: its own error, raised while handling the cause, with the
    cause's text in its message."""
    try:
        raise cause
    except BaseException:
        try:
            raise wrapper(message=text or str(cause), llm_provider="vertex_ai", model="gemini-1.5-pro")
        except BaseException as wrapped:
            return wrapped


def request() -> ModelRequest:
    return ModelRequest((ChatMessage.text("user", "Which organ is enlarged?"),), 0.3)


async def attempts_until_failure(*errors: BaseException) -> tuple[int, str]:
    transport = FailingTransport(*errors)
    model = RetryingModel(transport, max_retries=5, initial_wait=0.0, max_wait=0.0)
    with pytest.raises(ModelCallError) as caught:
        await model.request(request())
    return transport.attempts, str(caught.value)


def module_not_found(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named '{name}'", name=name)


async def test_a_missing_module_behind_litellms_connection_error_is_sent_once():
    litellm = import_litellm()
    attempts, message = await attempts_until_failure(
        litellm_wrapping(litellm.APIConnectionError, module_not_found("google"))
    )
    assert attempts == 1
    assert "No module named 'google'" in message and "pip install google-auth" in message
    assert "gave up" not in message


async def test_an_import_error_without_a_module_name_is_sent_once_and_shows_its_text():
    litellm = import_litellm()
    sdk_missing = ImportError("Google Cloud SDK not found. Install it with: pip install 'litellm[google]'")
    attempts, message = await attempts_until_failure(litellm_wrapping(litellm.APIConnectionError, sdk_missing))
    assert attempts == 1 and "pip install 'litellm[google]'" in message and "install what the error names" in message


async def test_a_plain_import_error_is_sent_once():
    attempts, message = await attempts_until_failure(module_not_found("boto3"))
    assert attempts == 1 and "pip install boto3" in message


async def test_a_connection_error_is_retried_even_while_an_unrelated_import_failed_nearby():
    """Adversarial: an ImportError handled nearby (a fallback import) is in the chain but is not the cause."""
    litellm = import_litellm()
    refused_connection = litellm_wrapping(litellm.APIConnectionError, module_not_found("orjson"),
                                          text="Connection refused")
    attempts, message = await attempts_until_failure(refused_connection)
    assert attempts == 6 and "gave up after 6 attempts" in message


def status_error(kind: type, status: int) -> BaseException:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
    return kind(message="invalid api key", llm_provider="openai", model="gpt-4o", response=response)


@pytest.mark.parametrize("kind, status", [("AuthenticationError", 401), ("PermissionDeniedError", 403)])
async def test_refused_credentials_are_sent_once(kind, status):
    attempts, message = await attempts_until_failure(status_error(getattr(import_litellm(), kind), status))
    assert attempts == 1 and f"HTTP {status}" in message and "credentials" in message


async def test_credentials_that_cannot_be_had_are_sent_once_whatever_status_the_wrapper_gives():
    """A token refresh that fails (google-auth's RefreshError) reaches us as LiteLLM's APIConnectionError,
    HTTP 500, which alone would be retried."""
    litellm = import_litellm()
    RefreshError = type("RefreshError", (Exception,), {})
    wrapped = litellm_wrapping(litellm.APIConnectionError, RefreshError("invalid_grant: Token has been revoked"))
    assert wrapped.status_code == 500
    attempts, message = await attempts_until_failure(wrapped)
    assert attempts == 1 and "Token has been revoked" in message


async def test_vertex_without_google_through_the_real_litellm_path_is_sent_once(monkeypatch):
    """LiteLLM's own vertex_ai path, with google-auth's import made to fail: one attempt, no request."""
    for name in ("google.auth", "google.oauth2"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("VERTEXAI_PROJECT", "my-project")
    monkeypatch.setenv("VERTEXAI_LOCATION", "us-central1")
    monkeypatch.setenv("VERTEX_AI_API_BASE", "http://127.0.0.1:9")  # the local-only policy's endpoint check
    transport = LiteLLMTransport(VERTEX, timeout=20.0)
    sent = []
    real_complete = transport._complete

    async def counted(arguments):
        sent.append(arguments["model"])
        return await real_complete(arguments)

    monkeypatch.setattr(transport, "_complete", counted)
    model = RetryingModel(transport, max_retries=4, initial_wait=0.0, max_wait=0.0)
    try:
        with pytest.raises(ModelCallError) as caught:
            await model.request(request())
    finally:
        await model.aclose()
    assert sent == [VERTEX]
    assert "google" in str(caught.value) and "pip install" in str(caught.value)


async def test_bedrock_without_credentials_through_the_real_litellm_path_is_sent_once(monkeypatch):
    monkeypatch.setenv("AWS_REGION_NAME", "us-east-1")
    monkeypatch.setenv("BEDROCK_API_BASE", "http://127.0.0.1:9")  # the local-only policy's endpoint check
    transport = LiteLLMTransport(BEDROCK, timeout=20.0)
    sent = []
    real_complete = transport._complete

    async def counted(arguments):
        sent.append(arguments["model"])
        return await real_complete(arguments)

    monkeypatch.setattr(transport, "_complete", counted)
    model = RetryingModel(transport, max_retries=4, initial_wait=0.0, max_wait=0.0)
    try:
        with pytest.raises(ModelCallError) as caught:
            await model.request(request())
    finally:
        await model.aclose()
    assert sent == [BEDROCK] and "credentials" in str(caught.value)


# -- the command: exit 2 before any request --------------------------------------------------------------


def launch(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    data = cwd / "cases.jsonl"
    data.write_text(json.dumps({"id": "c1", "question": "Which organ is enlarged?", "answer": "Liver"}) + "\n")
    base = {name: value for name, value in os.environ.items()
            if not name.startswith(("MICS_", *CLOUD_PREFIXES)) and name not in OTHER_CREDENTIALS
            and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))}
    base.update(LITELLM_LOCAL_MODEL_COST_MAP="True", COLUMNS="400", MICS_MAX_DEPTH="1",
                MICS_CACHE_PATH=str(cwd / "cache.sqlite"), HOME=str(cwd), AWS_EC2_METADATA_DISABLED="true",
                AWS_SHARED_CREDENTIALS_FILE=str(cwd / "none"), AWS_CONFIG_FILE=str(cwd / "none"))
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mics_agents", "run", str(data), "--output", str(cwd / "out.jsonl")],
        cwd=cwd, env=base, capture_output=True, text=True, timeout=120,
    )


def test_the_command_exits_2_before_any_request_for_each_missing_credential(tmp_path):
    with OpenAIServer() as server:
        local = {"MICS_MENTORS": "hosted_vllm/mentor-a,hosted_vllm/mentor-b", "MICS_INTERNS": "hosted_vllm/intern-1",
                 "HOSTED_VLLM_API_BASE": server.base_url}
        azure = launch(tmp_path, {**local, "MICS_JUDGE": AZURE})
        assert azure.returncode == 2, azure.stderr
        message = " ".join(azure.stderr.split())
        assert f"{AZURE} needs a key" in message and f"{AZURE} needs AZURE_API_BASE" in message
        assert "Traceback" not in message

        others = launch(tmp_path, {**local, "MICS_MENTORS": f"openai/gpt-4o,{BEDROCK}", "MICS_JUDGE": "hosted_vllm/j",
                                   "OPENAI_API_KEY": ""})
        assert others.returncode == 2, others.stderr
        message = " ".join(others.stderr.split())
        assert "openai/gpt-4o needs OPENAI_API_KEY, which is set to nothing" in message
        assert f"{BEDROCK} needs AWS credentials" in message and "Traceback" not in message
        assert server.count() == 0, "a request went out before the missing credentials were reported"
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""
