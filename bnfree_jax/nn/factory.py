"""Builds every network of a job (float and QAT teacher, student, tandem mixes) from one
place: the layer specs at the job's bit widths, the dataset's normalisation and the
deployment constraint, so no caller re-derives them."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from bnfree_jax.nn.network import make_network
from bnfree_jax.nn.zoo import LayerSpec


@dataclasses.dataclass(frozen=True)
class NetFactory:
    float_specs: tuple[LayerSpec, ...]
    quant_specs: tuple[LayerSpec, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]
    requant: str = "layer"
    act_init: float = 4.0  # every activation clip's initial value ...
    act_calibration: Optional[str] = None  # ... unless a calibrator sets them (model.act_init=NAME)
    bias_grid: bool = False  # model.bias_grid: the student's β trained on the artifact's grid

    def specs(self, quantized: bool = True) -> tuple[LayerSpec, ...]:
        return self.quant_specs if quantized else self.float_specs

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self.quant_specs]

    @property
    def per_channel(self) -> bool:
        return self.requant == "channel"

    def network(self, roles: Sequence[str] | str, quantized: bool = True,
                bn_axis_name: Optional[str] = None):
        """The network with `roles` (one for all layers, or one per layer)."""
        return make_network(self.specs(quantized), roles, self.mean, self.std, requant=self.requant,
                            bn_axis_name=bn_axis_name, act_init=self.act_init, bias_grid=self.bias_grid)
