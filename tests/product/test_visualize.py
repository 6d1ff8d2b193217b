"""The Fig. 5 grid: its shape, its columns, and cells that show the maps they stand for."""

import numpy as np
import pytest
import torch

from anystory.visualize import PALETTE
from anystory.pipelines import RoutingMaps
from anystory.testing import tiny_unet
from anystory.visualize import (
    BACKGROUND,
    HEADER_HEIGHT,
    LABEL_WIDTH,
    PAD,
    grid_shape,
    layer_groups,
    pick_steps,
    routing_grid,
)


def split_maps(steps: int, size: int) -> torch.Tensor:
    """(steps, 1, 3, size, size): subject 0 owns the left half, subject 1 the right."""
    maps = torch.zeros(steps, 1, 3, size, size)
    maps[:, :, 0, :, : size // 2] = 1
    maps[:, :, 1, :, size // 2 :] = 1
    return maps


def test_layer_groups_are_the_unet_stages_in_forward_order():
    groups = layer_groups(tiny_unet())
    assert [name for name, _ in groups] == ["down.1", "down.2", "mid", "up.0", "up.1"]
    assert [i for _, members in groups for i in members] == list(range(17))


def test_pick_steps_spreads_rows_over_the_schedule():
    assert pick_steps(25, 5) == [0, 6, 12, 18, 24]
    assert pick_steps(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError):
        pick_steps(0, 3)


def test_grid_cells_colour_each_region_by_its_owner():
    cell = 32
    refined = [split_maps(4, 8), split_maps(4, 4)]
    coarse = [torch.full((4, 1, 3, 8, 8), 1 / 3), torch.full((4, 1, 3, 4, 4), 1 / 3)]
    grid = routing_grid(RoutingMaps(refined=refined, coarse=coarse), rows=3, cell=cell)
    columns = 3  # two layers + their mean
    assert grid.size == grid_shape(3, columns, cell)
    pixels = np.asarray(grid).astype(np.float32)
    top = HEADER_HEIGHT + 2 * (cell + PAD)  # third row
    for c in range(columns):
        x = LABEL_WIDTH + c * (cell + PAD)
        assert np.array_equal(pixels[top + 5, x + 3], PALETTE[0].round())
        assert np.array_equal(pixels[top + 5, x + cell - 3], PALETTE[1].round())
    coarse_x = LABEL_WIDTH + columns * (cell + PAD) + 2 * PAD
    blended = (PALETTE[0] + PALETTE[1] + BACKGROUND) / 3
    assert np.abs(pixels[top + 5, coarse_x + 3] - blended).max() <= 1


def test_grid_refuses_groups_beyond_the_recorded_layers():
    maps = RoutingMaps(refined=[split_maps(2, 4)], coarse=[split_maps(2, 4)])
    with pytest.raises(ValueError, match="outside the 1 recorded"):
        routing_grid(maps, groups=[("x", [0, 3])])
