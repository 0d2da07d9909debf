"""Errors of forge-ckpt: a checkpoint that does not fit the model it is loaded into."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckpointMismatchError"]

_SHOW = 12  # names listed per category before "... and N more"


def _listing(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    shown = "\n".join(f"    {item}" for item in items[:_SHOW])
    more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"\n  {title} ({len(items)}):\n{shown}{more}"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model: tensors missing, unexpected or of the wrong shape.

    Attributes:
        missing: tensor names the model needs and the checkpoint lacks (checkpoint naming).
        unexpected: tensor names in the checkpoint that the model has no place for.
        mismatched: ``(name, checkpoint_shape, expected_shape)`` triples.
    """

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        context: str = "",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        shapes = [
            f"{name}: checkpoint {list(got)}, model expects {list(want)}"
            for name, got, want in self.mismatched
        ]
        message = (
            (context or "the checkpoint does not match the model")
            + _listing("missing from the checkpoint", self.missing)
            + _listing("unexpected in the checkpoint", self.unexpected)
            + _listing("mis-shaped", shapes)
            + "\n  Is this a checkpoint of another model (family, size or config)?"
        )
        super().__init__(message)
