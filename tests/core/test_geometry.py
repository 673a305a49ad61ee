from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import Geometry, InputError, Volume

# (z, y, x) axes mapped to world: an identity ITK direction and an RAS-flipped one (x, y negated)
IDENTITY = np.eye(3)[:, ::-1]
FLIPPED = np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], dtype=float)


@pytest.mark.parametrize(
    ("direction", "index", "expected"),
    [
        # world = origin + D @ (spacing * index); spacing (3, 2, 1), origin (10, 20, 30)
        (IDENTITY, (0, 0, 0), (10, 20, 30)),
        (IDENTITY, (1, 2, 3), (10 + 3 * 1, 20 + 2 * 2, 30 + 1 * 3)),
        (FLIPPED, (1, 2, 3), (10 - 3 * 1, 20 - 2 * 2, 30 + 1 * 3)),
    ],
)
def test_index_to_world_by_hand(direction, index, expected):
    g = Geometry(shape=(4, 5, 6), spacing=(3, 2, 1), origin=(10, 20, 30), direction=direction)
    np.testing.assert_allclose(g.index_to_world(index), expected)


def test_world_to_index_inverts_index_to_world():
    rot = np.array([[0.0, 0.6, -0.8], [0.0, 0.8, 0.6], [1.0, 0.0, 0.0]])  # oblique, orthonormal
    g = Geometry(shape=(7, 8, 9), spacing=(2.5, 0.7, 0.7), origin=(-3.2, 1.5, 8.0), direction=rot)
    idx = np.random.default_rng(0).uniform(-2, 10, size=(50, 3))
    np.testing.assert_allclose(g.world_to_index(g.index_to_world(idx)), idx, atol=1e-10)


def test_itk_round_trip_and_dict_round_trip():
    g = Geometry.from_itk((6, 5, 4), (1.0, 2.0, 3.0), (10, 20, 30), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert g.shape == (4, 5, 6)
    assert g.spacing == (3.0, 2.0, 1.0)
    np.testing.assert_array_equal(g.direction, FLIPPED)
    assert g.itk_direction() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert g.itk_spacing() == (1.0, 2.0, 3.0)
    assert Geometry.from_dict(g.to_dict()) == g


def test_contains_and_bounds():
    g = Geometry(shape=(2, 3, 4), spacing=(1, 1, 1))
    assert g.contains([[0, 0, 0], [1, 2, 3], [1.4, 2.4, 3.4]]).all()
    assert not g.contains([[-0.6, 0, 0]]).any()
    lo, hi = g.world_bounds()
    np.testing.assert_allclose(lo, (0, 0, 0))
    np.testing.assert_allclose(hi, (3, 2, 1))  # world (x, y, z) of index (1, 2, 3)


def test_mismatch_messages():
    g = Geometry(shape=(2, 3, 4), spacing=(3, 1, 1))
    assert g.mismatch(Geometry(shape=(2, 3, 4), spacing=(3, 1, 1), origin=(0, 0, 1e-6))) == ""
    assert "shape" in g.mismatch(Geometry(shape=(2, 3, 5), spacing=(3, 1, 1)))
    assert "spacing" in g.mismatch(Geometry(shape=(2, 3, 4), spacing=(2, 1, 1)))
    assert "origin" in g.mismatch(Geometry(shape=(2, 3, 4), spacing=(3, 1, 1), origin=(0, 0.5, 0)))
    assert "direction" in g.mismatch(
        Geometry(shape=(2, 3, 4), spacing=(3, 1, 1), direction=FLIPPED)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (2, 3), "spacing": (1, 1, 1)}, "shape"),
        ({"shape": (2, 3, 0), "spacing": (1, 1, 1)}, "shape"),
        ({"shape": (2, 3, 4), "spacing": (1, 0, 1)}, "spacing"),
        ({"shape": (2, 3, 4), "spacing": (1, 1, 1), "direction": np.ones((3, 3))}, "orthonormal"),
        ({"shape": (2, 3, 4), "spacing": (1, 1, float("nan"))}, "finite"),
    ],
)
def test_bad_geometry_is_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        Geometry(**kwargs)


def test_volume_checks_shape():
    g = Geometry(shape=(2, 3, 4), spacing=(1, 1, 1))
    with pytest.raises(InputError, match="does not match"):
        Volume(array=np.zeros((2, 3, 5)), geometry=g)
    v = Volume(array=np.zeros((2, 3, 4)), geometry=g, source="x")
    assert v.with_array(np.ones((2, 3, 4))).source == "x"
