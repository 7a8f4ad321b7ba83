"""What the library's autograd Functions share: refusing what they cannot differentiate.

The engine's backward passes (and the gather's) are built from in-place and
``out=`` ops, not from differentiable ones: a second derivative through them
would silently be wrong, and vmap cannot batch them. These helpers turn each
such use into a clear error, and let torch.func's ``grad`` and ``vjp`` (which
run every backward with grad mode on) through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor
from torch._C._functorch import (
    TransformType,
    get_unwrapped,
    is_functorch_wrapped_tensor,
    peek_interpreter_stack,
)
from torch._functorch.pyfunctorch import (
    retrieve_all_functorch_interpreters,
    temporarily_clear_interpreter_stack,
)


def guard_backward(function: str, hint: str = "") -> bool:
    """Check that a backward may run; return whether its gradients must refuse a derivative.

    The Functions' backward passes are not built from differentiable ops, so a
    second derivative through them would silently be wrong; ``once_differentiable``
    does not help, as it only refuses when the incoming gradient itself needs
    a gradient, which a loss's first derivative does not. With grad mode on
    (``create_graph=True``; torch.func's ``grad`` and ``vjp`` always run
    backward so) the backward runs without it and its gradients raise if they
    are differentiated (`refuse_derivative`): a single torch.func transform
    works. Nested transforms (``grad`` of ``grad``) and ``vmap`` (``jacrev``)
    raise at once.

    Raises:
        RuntimeError: nested torch.func transforms, or vmap.
    """
    if not torch.is_grad_enabled():
        return False
    transforms = [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]
    if TransformType.Vmap in transforms:
        raise RuntimeError(_NO_VMAP.format(function=function, hint=hint))
    if len(transforms) > 1:
        raise RuntimeError(_NO_DOUBLE.format(function=function, hint=hint))
    return True


# The engine's hint: what does support it.
DENSE_HINT = "; the dense path does, and is taken for small problems with chunk_size=None"
_NO_DOUBLE = (
    "{function} does not support differentiating the loss twice "
    "(create_graph=True / double backward, nested torch.func.grad){hint}"
)
_NO_VMAP = (
    "{function} does not support torch.func.vmap (nor jacrev/jacfwd, which vmap); "
    "call the loss once per sample{hint}"
)
_NO_JVP = (
    "{function} does not support forward-mode AD (torch.func.jvp, jacfwd, "
    "torch.autograd.forward_ad); use reverse mode (grad, vjp){hint}"
)


def refuse_derivative(
    function: str,
    grads: tuple[Tensor | None, ...],
    inputs: tuple[Tensor | None, ...],
    hint: str = "",
) -> tuple[Tensor | None, ...]:
    """The gradients, made to raise if they are differentiated (as ``once_differentiable`` does).

    They hang off the Function's ``inputs`` that need a gradient through a
    node whose backward raises (inside a torch.func transform, unlike
    ``once_differentiable``, no tensor may be made to require a gradient).
    """
    anchors = [x for x in inputs if x is not None and x.requires_grad]
    message = _NO_DOUBLE.format(function=function, hint=hint)
    delayed = torch._C._functions.DelayedError(message, len(grads) + len(anchors))
    # (DelayedError passes None, an undefined gradient, through; its stub says Tensor.)
    refused = delayed(*cast(tuple[Tensor, ...], grads), *anchors)
    return tuple(refused[: len(grads)])


def refuse_vmap(function: str, hint: str = "") -> Any:
    """A Function's ``vmap`` staticmethod that raises a clear error."""

    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        raise RuntimeError(_NO_VMAP.format(function=function, hint=hint))

    return staticmethod(vmap)


def refuse_transforms(function: str, hint: str = "") -> None:
    """Raise a clear error under torch.func's forward mode (jvp, jacfwd) and vmap.

    Called before a Function runs (its ``vmap`` staticmethod says so too, but
    a Function that needs no gradient is not applied; and Dynamo cannot
    trace a Function with a ``jvp`` staticmethod).

    Raises:
        RuntimeError: under ``torch.func.jvp``, ``jacfwd`` or ``vmap``.
    """
    if torch.compiler.is_compiling():
        return
    transforms = [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]
    if TransformType.Jvp in transforms:
        raise RuntimeError(_NO_JVP.format(function=function, hint=hint))
    if TransformType.Vmap in transforms:
        raise RuntimeError(_NO_VMAP.format(function=function, hint=hint))


def plain_values(tensor: Tensor) -> Tensor:
    """The tensor under torch.func's wrappers (itself outside any transform)."""
    while is_functorch_wrapped_tensor(tensor):
        tensor = get_unwrapped(tensor)
    return tensor


@contextlib.contextmanager
def outside_transforms(what: str) -> Iterator[Callable[[Tensor], Tensor]]:
    """Within: buffers may be written in place under torch.func's ``grad``/``vjp``.

    A buffer written in place (a queue's ring) holds values, never
    differentiated; a torch.func transform forbids writing into a tensor it
    did not create. Within, the transforms are set aside, and the yielded
    function turns a tensor from inside them into its plain values.

    Raises:
        RuntimeError: under ``vmap``, where the values hold a batch dimension.
    """
    if torch.compiler.is_compiling() or peek_interpreter_stack() is None:
        yield lambda tensor: tensor
        return
    if any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters()):
        raise RuntimeError(f"{what} is not supported under torch.func.vmap")

    with temporarily_clear_interpreter_stack():
        yield plain_values
