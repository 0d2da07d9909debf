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
    """A checkpoint does not match the model: tensors missing, unexpected, of the wrong shape or
    of a non-floating dtype.

    Attributes:
        missing: tensor names the model needs and the checkpoint lacks (checkpoint naming).
        unexpected: tensor names in the checkpoint that the model has no place for.
        mismatched: ``(name, checkpoint_shape, expected_shape)`` triples.
        wrong_dtype: ``(name, checkpoint dtype)`` of integer / boolean tensors where the model
            holds floating-point weights.
    """

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        wrong_dtype: Sequence[tuple[str, str]] = (),
        context: str = "",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.wrong_dtype = sorted(wrong_dtype)
        shapes = [
            f"{name}: checkpoint {list(got)}, model expects {list(want)}"
            for name, got, want in self.mismatched
        ]
        message = (
            (context or "the checkpoint does not match the model")
            + _listing("missing from the checkpoint", self.missing)
            + _listing("unexpected in the checkpoint", self.unexpected)
            + _listing("mis-shaped", shapes)
            + _listing(
                "not floating-point (the model's weights are: re-export them as float32, "
                "bfloat16 or float16)",
                [f"{name}: {dtype}" for name, dtype in self.wrong_dtype],
            )
            + "\n  Is this a checkpoint of another model (family, size or config)?"
        )
        super().__init__(message)
