"""The OpenAI request bodies the server accepts, checked by pydantic (strict types: a string is not a number), and
the OpenAI error shape. Fields a client may send that the server does not use are accepted and ignored."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

Probability = Annotated[float, Field(strict=True, gt=0.0, le=1.0)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, strict=True, ge=0.0, le=2.0)
    top_p: Probability = 1.0
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's parameters are nullable: null means the default (or, for a required one, missing)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of several is not supported)")
            return v[0]
        return v


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> dict:
    """OpenAI's error body for the first of pydantic's errors: one sentence, the parameter, a code."""
    first = errors[0]
    kind = first.get("type", "")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    if kind == "missing":
        return error_body(f"'{param}' is required", code="missing_required_parameter", param=param)
    if kind in ("json_invalid", "model_attributes_type", "dict_type") and param is None:
        return error_body("the request body must be a JSON object", code="invalid_json")
    reason = first.get("msg", "invalid").removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return error_body(f"'{param}': {reason}" if param else reason, code=code, param=param)
