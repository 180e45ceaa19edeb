"""The two models the pipeline trains side by side, and the names of their steps."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    suffix: str  # CamelCase, ends every step name of this model: TrainSingleInstance
    slug: str  # kebab-case, for endpoint and job names
    title: str  # for display names

    def step(self, verb: str) -> str:
        return f"{verb}{self.suffix}"

    def names(self, verb: str, label: str) -> dict[str, str]:
        """A step's name and display name, as keyword arguments: TrainSingleInstance, "Train (single instance)"."""
        return {"name": self.step(verb), "display_name": f"{label} ({self.title})"}


SINGLE = Variant("SingleInstance", "single-instance", "single instance")
MULTI = Variant("MultiInstance", "multi-instance", "multi instance")
VARIANTS = (SINGLE, MULTI)


def twin_of(variant: Variant) -> Variant:
    """The other model of the pair."""
    return MULTI if variant == SINGLE else SINGLE
