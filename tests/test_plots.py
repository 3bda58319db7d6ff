"""dyconv_teach.plots: the diagrams wire exactly the channels that convolution connects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba

from dyconv_teach.plots import draw_batch_as_groups, draw_group_wiring


@pytest.mark.parametrize("C, O, g", [(4, 6, 1), (4, 6, 2), (8, 8, 4), (6, 3, 3)])
def test_group_wiring_lines(C: int, O: int, g: int) -> None:
    fig = draw_group_wiring(C, O, g)
    ax = fig.axes[0]
    # One line per (input channel, kernel) pair inside a group: g * (C/g) * (O/g).
    assert len(ax.lines) == C * O // g
    # Lines of different groups have different colors, one color per group.
    assert len({to_rgba(line.get_color()) for line in ax.lines}) == g
    assert not plt.fignum_exists(fig.number), "the figure must be closed in pyplot (shown once per cell)"


@pytest.mark.parametrize("B, C, O, g", [(1, 4, 4, 1), (3, 4, 4, 1), (2, 4, 6, 2)])
def test_batch_as_groups_lines(B: int, C: int, O: int, g: int) -> None:
    ax = draw_batch_as_groups(B, C, O, g).axes[0]
    assert len(ax.lines) == B * C * O // g  # B*g groups of (C/g) x (O/g) wires
    assert len({to_rgba(line.get_color()) for line in ax.lines}) == B  # one color per sample
    texts = [t.get_text() for t in ax.texts]
    assert f"x.reshape(1, B*C={B * C}, H, W)" in texts and all(f"sample b={b}" in texts for b in range(B))


@pytest.mark.parametrize("draw, args, message", [
    (draw_group_wiring, (6, 4, 4), "g=4 must divide C=6"),
    (draw_group_wiring, (4, 6, 4), "g=4 must divide O=6"),
    (draw_batch_as_groups, (0, 4, 4, 1), "B must be >= 1, got 0"),
])
def test_bad_arguments(draw, args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw(*args)
