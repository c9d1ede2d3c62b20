"""A teacher held outside the module tree: frozen, in eval mode, not in ``state_dict``, moved with the module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self, override


class FrozenTeacherMixin(nn.Module):
    """Gives a module a ``teacher`` attribute that is not a registered submodule.

    Setting ``teacher`` freezes it (no gradients, eval mode). It is not in ``state_dict()``,
    ``parameters()`` or ``children()`` (so no optimizer or DDP wrapper sees it), stays in eval mode when
    the module is put in training mode, and is moved and cast with the module (``.to()``, ``.half()``...).
    Put it before the ``nn.Module`` base: ``class M(FrozenTeacherMixin, pl.LightningModule)``.
    """

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule, so not in ``state_dict`` or ``parameters``)."""
        teacher: nn.Module = self.__dict__["_frozen_teacher"]
        return teacher

    @teacher.setter
    def teacher(self, teacher: nn.Module) -> None:
        teacher.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "_frozen_teacher", teacher)  # bypasses nn.Module registration
        self._teacher_changed()

    def _teacher_changed(self) -> None:
        """Called after a new teacher is set: forget what was measured on the old one."""

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":  # nn.Module.__setattr__ would register it as a submodule
            object.__setattr__(self, name, value)  # runs the property setter
        else:
            super().__setattr__(name, value)

    @override
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        # .to(), .cuda(), .half(), .double()... move and cast the teacher with the student.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if recurse and "_frozen_teacher" in self.__dict__:
            self.teacher._apply(fn)  # type: ignore[no-untyped-call]
        return self

    @override
    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self.teacher.eval()
        return self

    @override
    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.teacher.parameters())
        return f"(teacher): {type(self.teacher).__name__} (frozen, {n:,} parameters, not in state_dict)"

    def _teacher_forward(self, x: Any) -> Any:
        teacher = self.teacher
        if teacher.training:  # someone called teacher.train() directly
            teacher.eval()
        with torch.no_grad():
            return teacher(x)
