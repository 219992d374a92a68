"""``RemoteActivation``: a ``torch.nn.Module`` whose forward runs on an actserve server.

An existing model can swap ``nn.ReLU()`` for ``RemoteActivation("relu", client=client)``;
the output keeps the input's shape, dtype (unless ``compute_dtype`` or ``amp`` says
otherwise) and device. Gradients flow through it: with autograd recording, the forward pass
is a ``torch.autograd.Function`` whose backward asks the server for the vector-Jacobian
product (``outputs=["grad"]`` with the upstream gradient), which is what autograd computes
locally for the same activation, bit for bit, on CPU (docs/lab.md).

Importing this module needs torch (``pip install actserve-client[torch]``).
"""

from __future__ import annotations

from typing import Any

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised in the no-torch environment test
    raise ImportError(
        "actserve_client.torch needs torch; install it (pip install actserve-client[torch]) "
        "or use actserve_client.Client with numpy arrays"
    ) from exc

from ._sync import Client

__all__ = ["RemoteActivation"]


class _Remote(torch.autograd.Function):
    """Forward: the value from the server; backward: the server's vector-Jacobian product
    for the saved input and the upstream gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: RemoteActivation) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(x)
        return module.client.activate(module.name, x.detach(), **module.options)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        module = ctx.module
        # the upstream gradient travels in the input's dtype (exact for a wider input)
        options = {k: v for k, v in module.options.items() if k not in ("inplace", "protocol")}
        answer = module.client.activate(module.name, x.detach(), outputs=["grad"],
                                        grad_output=grad_y.detach().to(x.dtype).contiguous(),
                                        inplace=False, **options)
        return answer.grad, None


class RemoteActivation(nn.Module):
    """``RemoteActivation(name, client=Client(...) or "http://host:port", **params)``.

    ``**params`` are the activation's parameters (``negative_slope=0.2``) and any per-call
    setting of ``Client.activate`` (``compute_dtype``, ``amp``, ``inplace``, ``timeout``,
    ``protocol``). A client given as a URL is owned by the module; ``close()`` releases it.
    """

    def __init__(self, name: str, client: Client | str, **params: Any) -> None:
        super().__init__()
        if isinstance(client, str):
            client = Client(client)
            self._owns_client = True
        elif isinstance(client, Client):
            self._owns_client = False
        else:
            raise TypeError(f"client must be an actserve_client.Client or a URL, got "
                            f"{type(client).__name__}")
        self.name = name
        self.client = client
        self.options = dict(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RemoteActivation expects a torch.Tensor, got {type(x).__name__}")
        if x.requires_grad and torch.is_grad_enabled():
            return _Remote.apply(x, self)
        return self.client.activate(self.name, x, **self.options)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def extra_repr(self) -> str:
        parts = [repr(self.name), *(f"{k}={v!r}" for k, v in self.options.items())]
        return ", ".join(parts) + f", server={self.client.base_url!r}"
