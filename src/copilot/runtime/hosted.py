"""The HTTP client of every hosted model (a vision model behind an inference endpoint, a chat model behind an
OpenAI-compatible API): bearer auth, one timeout per attempt, and retries with exponential back-off and
jitter on what a busy or restarting model server answers (connection errors, timeouts, 429, 5xx; a
`Retry-After` is honoured up to the back-off cap). Other statuses fail at once with httpx.HTTPStatusError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings

if TYPE_CHECKING:
    import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 8.0


class HostedModel(BaseModel):
    """Where a hosted model is and how to call it; the same fields for the vision and the knowledge service
    (`VISION_MODEL_*`, `KNOWLEDGE_MODEL_*`)."""

    endpoint: str = ""
    name: str = ""
    api_key: SecretStr = SecretStr("")
    timeout_s: float = Field(60.0, gt=0)
    attempts: int = Field(3, ge=1, le=10)


class HostedModelSettings(BaseSettings):
    """The settings of a service that can call a hosted model, under its own prefix (`VISION_MODEL_ENDPOINT`,
    `KNOWLEDGE_MODEL_ENDPOINT`, ...)."""

    model_endpoint: str = Field(
        "",
        description="the model server's URL (an inference endpoint, or the base URL "
        "of an OpenAI-compatible API such as http://vllm:8000/v1)",
    )
    model_name: str = Field("", description="the model to ask for (OpenAI-compatible APIs)")
    model_api_key: SecretStr = Field(SecretStr(""), description="bearer token, from a Secret; never logged")
    model_timeout_s: float = Field(60.0, gt=0, description="per attempt")
    model_attempts: int = Field(3, ge=1, le=10, description="tries on connection errors, timeouts, 429 and 5xx")

    def hosted_model(self) -> HostedModel:
        return HostedModel(
            endpoint=self.model_endpoint,
            name=self.model_name,
            api_key=self.model_api_key,
            timeout_s=self.model_timeout_s,
            attempts=self.model_attempts,
        )


class RetryableStatus(Exception):
    """A hosted model's HTTP answer worth retrying (429, 5xx), with its response."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} from {response.request.url}")
        self.response = response


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(response.headers.get("retry-after", "0"))))
    except ValueError:
        return 0.0


def _policy(attempts: int) -> dict[str, Any]:
    import httpx
    from tenacity import retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

    def wait(state: Any) -> float:
        backoff = wait_exponential_jitter(multiplier=0.5, max=MAX_BACKOFF_S)(state)
        exc = state.outcome.exception() if state.outcome else None
        return max(backoff, _retry_after(exc.response)) if isinstance(exc, RetryableStatus) else backoff

    return {
        "stop": stop_after_attempt(attempts),
        "wait": wait,
        "retry": retry_if_exception_type((httpx.TransportError, RetryableStatus)),
        "reraise": True,
    }


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code in RETRY_STATUSES:
        raise RetryableStatus(response)
    response.raise_for_status()
    return response


def _unwrap(exc: RetryableStatus) -> httpx.HTTPStatusError:
    import httpx

    return httpx.HTTPStatusError(str(exc), request=exc.response.request, response=exc.response)


def _headers(model: HostedModel) -> dict[str, str]:
    key = model.api_key.get_secret_value()
    return {"Authorization": f"Bearer {key}"} if key else {}


class HostedModelClient:
    """Blocking calls (the knowledge generators run in worker threads)."""

    def __init__(self, model: HostedModel) -> None:
        import httpx

        self.model = model
        self.client = httpx.Client(headers=_headers(model), timeout=model.timeout_s)

    def post(
        self, url: str, *, json: Any = None, content: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        from tenacity import Retrying

        try:
            for attempt in Retrying(**_policy(self.model.attempts)):
                with attempt:
                    return _checked(self.client.post(url, json=json, content=content, headers=headers))
        except RetryableStatus as exc:
            raise _unwrap(exc) from None
        raise AssertionError("tenacity returns or raises")

    def close(self) -> None:
        self.client.close()


class AsyncHostedModelClient:
    """asyncio calls (the vision providers run on the server's event loop)."""

    def __init__(self, model: HostedModel) -> None:
        import httpx

        self.model = model
        self.client = httpx.AsyncClient(headers=_headers(model), timeout=model.timeout_s)

    async def post(
        self, url: str, *, json: Any = None, content: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        from tenacity import AsyncRetrying

        try:
            async for attempt in AsyncRetrying(**_policy(self.model.attempts)):
                with attempt:
                    return _checked(await self.client.post(url, json=json, content=content, headers=headers))
        except RetryableStatus as exc:
            raise _unwrap(exc) from None
        raise AssertionError("tenacity returns or raises")

    async def close(self) -> None:
        await self.client.aclose()


def join(base_url: str, path: str) -> str:
    """`http://host/v1` + `/chat/completions`."""
    return base_url.rstrip("/") + path
