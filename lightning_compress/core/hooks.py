"""Module hooks that an object puts on and takes off again as one set.

:class:`HookSet` keeps the handles and makes putting the hooks on and taking them off idempotent; a
subclass yields the hooks it registers from ``_register_hooks`` and names the verbs as its users
know them (``install`` / ``remove`` of the input-norm collector, ``attach`` / ``detach`` of a
fake-quantization session).

Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet"]


class HookSet:
    """The handles of the hooks an object registered, put on and taken off together.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Counter(HookSet):
        ...     def __init__(self, module):
        ...         super().__init__()
        ...         self.module, self.calls = module, 0
        ...     def _register_hooks(self):
        ...         yield self.module.register_forward_pre_hook(lambda m, args: setattr(self, "calls", self.calls + 1))
        >>> layer = nn.Linear(2, 2)
        >>> counter = Counter(layer)
        >>> counter._put_hooks_on(); counter._put_hooks_on()  # idempotent: one hook
        >>> _ = layer(torch.ones(1, 2)); counter._take_hooks_off(); _ = layer(torch.ones(1, 2))
        >>> counter.calls, counter._hooks_on
        (1, False)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def _hooks_on(self) -> bool:
        """Whether the hooks are on the modules now."""
        return bool(self._handles)

    def _put_hooks_on(self) -> None:
        """Register the hooks (idempotent: while they are on, nothing more is registered)."""
        if not self._handles:
            # Kept one by one: a registration that fails leaves the earlier ones removable.
            self._handles.extend(self._register_hooks())

    def _take_hooks_off(self) -> None:
        """Remove the hooks (idempotent); what they collected stays."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _register_hooks(self) -> Iterable[RemovableHandle]:
        """Register the hooks on the modules, yielding each handle."""
        raise NotImplementedError(f"{type(self).__name__} registers no hooks.")
