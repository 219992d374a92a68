"""Python client for actserve: activation functions as a service.

>>> from actserve_client import Client
>>> with Client("http://127.0.0.1:8000") as client:            # doctest: +SKIP
...     y = client.activate("leaky_relu", x, negative_slope=0.1)

``Client`` and ``AsyncClient`` take numpy arrays, torch tensors or nested lists and give
back the same kind. ``actserve_client.torch.RemoteActivation`` (needs torch) is an
``nn.Module`` that runs its activation on the server. Needs only numpy and httpx.
"""

from ._async import AsyncClient
from ._base import (
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT_S,
    ActivationInfo,
    Answer,
)
from ._exceptions import (
    ActserveError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    InvalidInputError,
    MalformedResponseError,
    NotFoundError,
    OverloadedError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServerError,
    UnsupportedMediaTypeError,
)
from ._protocol import PROTOCOLS
from ._retry import DEFAULT_MAX_RETRIES, RetryPolicy
from ._sync import Client
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "PROTOCOLS",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ActivationInfo",
    "ActserveError",
    "Answer",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "DeadlineExceededError",
    "InvalidInputError",
    "MalformedResponseError",
    "NotFoundError",
    "OverloadedError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "RetryPolicy",
    "ServerError",
    "UnsupportedMediaTypeError",
    "__version__",
]
