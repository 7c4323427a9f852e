"""Weight analysis recovers known answers on constructed matrices: energy ranks
of chosen spectra, planted intruder dimensions, subspace similarities, and the
per-matrix walk over plain, adapter and scanned params."""

import json

import jax
import numpy as np
import pytest
from hf_fixtures import LowRankLeaf, low_rank_adapt, tiny_model

from ftjax.analysis import (
    adapter_subspace_similarity,
    analyze_update,
    energy_rank,
    intruder_dimensions,
    relative_update_norm,
    similarity_grid,
    subspace_similarity,
    update_spectrum,
    weight_matrices,
)
from ftjax.models import stack_layers


def _orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return q


def _with_spectrum(rng, d_in, d_out, values):
    """A (d_in, d_out) kernel whose singular values are `values`."""
    k = len(values)
    return _orthonormal(rng, d_in, k) @ np.diag(values) @ _orthonormal(rng, d_out, k).T


def _numpy_energy_rank(m, energy):
    s2 = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(s2) / s2.sum() >= energy - 1e-9) + 1)


@pytest.mark.parametrize(
    "values,energy,rank",
    [
        ([8.0, 4.0, 2.0, 1.0, 0.5], 0.9, 2),  # 64/85.25 = 0.75, 80/85.25 = 0.94
        ([1.0] * 6, 0.9, 6),  # flat: 5/6 < 0.9
        ([1.0] * 6, 0.8, 5),  # flat: 4/6 < 0.8 <= 5/6
        ([3.0] * 7, 1.0, 7),  # all the energy: exactly the rank
    ],
)
def test_energy_rank_of_a_chosen_spectrum(values, energy, rank):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(48, 32))
    delta = _with_spectrum(rng, 48, 32, values)
    got = update_spectrum(base, base + delta, energy=energy)
    assert got["energy_rank"] == rank == _numpy_energy_rank(delta, energy)
    np.testing.assert_allclose(
        got["singular_values"][: len(values)], sorted(values)[::-1], rtol=1e-4
    )
    assert max(got["singular_values"][len(values) :]) < 1e-4  # rank k: the rest is zero
    assert got["max_rank"] == 32
    np.testing.assert_allclose(
        got["relative_norm"], np.linalg.norm(delta) / np.linalg.norm(base), rtol=1e-5
    )


def test_energy_rank_edge_cases():
    assert energy_rank([3.0, 1.0, 1.0], 0.9) == 2
    assert energy_rank([0.0, 0.0]) == 0
    assert energy_rank([1.0, 0.0, 0.0], 0.99) == 1
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        energy_rank([1.0], 0.0)
    assert relative_update_norm(np.eye(3), 1.1 * np.eye(3)) == pytest.approx(0.1, rel=1e-6)


def _tall_base(rng):
    """A (24 in, 64 out) kernel with distinct singular values: its 24
    output-space singular vectors leave 40 directions free for planting."""
    return _with_spectrum(rng, 24, 64, np.linspace(5.0, 1.0, 24))


def _outside(base, rng, count):
    """`count` orthonormal output-space directions orthogonal to the base's range."""
    _, _, vh = np.linalg.svd(base, full_matrices=False)
    y = rng.normal(size=(64, count))
    y -= vh.T @ (vh @ y)
    return np.linalg.qr(y)[0]


@pytest.mark.parametrize("planted", [1, 2, 3])
def test_planted_orthogonal_directions_are_intruders(planted):
    rng = np.random.default_rng(planted)
    base = _tall_base(rng)
    y = _outside(base, rng, planted)
    # Read the new outputs from the base's weakest input directions, so that
    # the rest of the base's singular vectors stay as they were.
    x = np.linalg.svd(base, full_matrices=False)[0][:, -planted:]
    strengths = np.array([30.0, 25.0, 20.0][:planted])  # above the base's top value, 5
    tuned = base + x @ np.diag(strengths) @ y.T
    got = intruder_dimensions(base, tuned, k=10, eps=0.5)
    assert got["count"] == planted and got["indices"] == list(range(planted))
    assert max(got["max_cosine"][:planted]) < 0.5 < min(got["max_cosine"][planted:])


def test_small_perturbations_have_no_intruders():
    rng = np.random.default_rng(7)
    base = _tall_base(rng)
    u, s, vh = np.linalg.svd(base, full_matrices=False)
    inside = u[:, :10] @ (0.05 * rng.normal(size=(10, 10))) @ vh[:10]  # within the top subspace
    assert intruder_dimensions(base, base + inside)["count"] == 0
    noise = 1e-3 * rng.normal(size=base.shape)
    got = intruder_dimensions(base, base + noise)
    assert got["count"] == 0 and min(got["max_cosine"]) > 0.9
    # A planted direction is an intruder only when it ranks in the top k: this
    # one has singular value sqrt(1 + 2^2) = 2.2, 17th of 24, and cosine
    # 1/sqrt(5) = 0.45 with the base's weakest vector, which it grows from.
    weak = base + 2.0 * u[:, -1:] @ _outside(base, rng, 1).T
    assert intruder_dimensions(base, weak, k=10)["count"] == 0
    assert intruder_dimensions(base, weak, k=24)["indices"] == [16]


def test_subspace_similarity_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(256, 8))
    mix = rng.normal(size=(8, 8))  # an invertible change of basis spans the same subspace
    assert subspace_similarity(a, a @ mix) == pytest.approx(1.0, abs=1e-5)
    assert subspace_similarity(a, a, 3, 3) == pytest.approx(1.0, abs=1e-5)
    q = _orthonormal(rng, 256, 16)
    assert subspace_similarity(q[:, :8], q[:, 8:]) == pytest.approx(0.0, abs=1e-6)
    # A subspace inside another: phi = 1 at (8, 4).
    grid = similarity_grid(a, a[:, :4])
    assert grid.shape == (8, 4) and grid[7, 3] == pytest.approx(1.0, abs=1e-5)
    # Random subspaces: E[phi(r, r)] = r / d.
    draws = [
        subspace_similarity(rng.normal(size=(256, 8)), rng.normal(size=(256, 8))) for _ in range(20)
    ]
    assert np.mean(draws) == pytest.approx(8 / 256, rel=0.25)
    with pytest.raises(ValueError, match=r"1 <= i <= 8"):
        subspace_similarity(a, a, 9, 1)


def test_analyze_update_on_adapter_params_scanned_or_not():
    model, base = tiny_model("llama")
    tuned = low_rank_adapt(base, rank=2, seed=0)
    report = analyze_update(base, tuned, k=4)
    names = sorted(report["per_matrix"])
    assert names == sorted(
        f"model/layers_{i}/self_attn/{m}/kernel" for i in range(2) for m in ("q_proj", "v_proj")
    )
    assert report["unchanged"] == 2 * 5  # k, o, gate, up, down in each layer
    for row in report["per_matrix"].values():
        assert row["energy_rank"] <= 2 and max(row["singular_values"][2:]) < 1e-4
    agg = report["aggregate"]
    assert set(agg) == {"self_attn/q_proj", "self_attn/v_proj", "all"}
    assert agg["all"]["matrices"] == 4
    json.dumps(report)  # JSON-able as it is
    # Scanned params give the same matrices under the same names.
    cfg = model.cfg
    scanned = analyze_update(stack_layers(cfg, base), stack_layers(cfg, tuned), k=4)
    assert sorted(scanned["per_matrix"]) == names
    for name in names:
        np.testing.assert_allclose(
            scanned["per_matrix"][name]["singular_values"],
            report["per_matrix"][name]["singular_values"],
            rtol=1e-5,
        )
    assert set(weight_matrices(stack_layers(cfg, base))) == set(weight_matrices(base))


def _phi_numpy(a1, a2, i, j):
    """||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), U the left singular vectors."""
    u1 = np.linalg.svd(np.asarray(a1, np.float64), full_matrices=False)[0][:, :i]
    u2 = np.linalg.svd(np.asarray(a2, np.float64), full_matrices=False)[0][:, :j]
    return float(np.sum((u1.T @ u2) ** 2) / min(i, j))


def weight_leaves(params):
    """('/'-joined path, leaf) of every LowRankLeaf, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, LowRankLeaf)
    )[0]
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in flat
        if isinstance(leaf, LowRankLeaf)
    ]


def test_adapter_subspace_similarity_between_runs():
    _, base = tiny_model("llama")
    run = low_rank_adapt(base, rank=4, seed=0)
    same = adapter_subspace_similarity(run, run)
    assert same["mean"] == pytest.approx(1.0, abs=1e-5) and len(same["per_matrix"]) == 4
    run2 = low_rank_adapt(base, rank=4, seed=1)
    other = adapter_subspace_similarity(run2, run, i=1, j=2)
    # Against the LoRA paper's definition (its eq. 4) in float64 numpy, per matrix.
    leaves = {
        name: (x.a, y.a)
        for (name, x), (_, y) in zip(weight_leaves(run2), weight_leaves(run), strict=True)
    }
    want = {name: _phi_numpy(a1, a2, 1, 2) for name, (a1, a2) in leaves.items()}
    assert other["per_matrix"] == pytest.approx(want, abs=1e-5)
    assert other["mean"] == pytest.approx(np.mean(list(want.values())), abs=1e-5)
    assert other["mean"] < 0.5  # two random subspaces of R^32 barely overlap
    scanned = adapter_subspace_similarity(stack_layers(tiny_model("llama")[0].cfg, run), run)
    assert scanned["per_matrix"].keys() == same["per_matrix"].keys()
    with pytest.raises(ValueError, match=r"adapt different matrices"):
        adapter_subspace_similarity(run, low_rank_adapt(base, 4, 0, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"no adapter leaves"):
        adapter_subspace_similarity(base, run)
