"""Built-in probe plugin: difference in means (Arditi et al. 2024)."""

from __future__ import annotations

import torch

from aird.core.directions import diff_in_means
from aird.core.hookspecs import hookimpl


class DiffInMeans:
    name = "diff-in-means"
    description = "mean activation on harmful prompts minus mean on harmless ones, per layer and position"

    def directions(self, harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
        return diff_in_means(harmful, harmless)


@hookimpl
def aird_register_probes(register):
    register(DiffInMeans())
