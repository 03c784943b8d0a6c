"""Where expert records lie in experts.bin: a layer's experts often chosen together side by side
(profile.py coactivation_order), so that the runtime reads a layer's misses in fewer requests."""
import numpy as np
import pytest

from edgemoe.compiler.expert_image import ExpertWeights, ImageWriter, read_experts, read_table, record_payload
from edgemoe.compiler.profile import RoutingProfile, tokenize_file
from edgemoe.compiler.quantize import quantize


def test_experts_chosen_together_are_placed_side_by_side(rng):
    """Routing where experts come in fixed pairs (plus noise): each pair ends up adjacent, the most
    chosen expert first, and every layer's order names each expert once."""
    E, k, tokens = 12, 4, 400
    pairs = rng.permutation(E).reshape(-1, 2)
    selected = np.zeros((tokens, 2, k), np.int64)
    for t in range(tokens):
        for layer in range(2):
            chosen = pairs[rng.choice(len(pairs), 2, replace=False, p=np.arange(1, 7) / 21)].ravel()
            selected[t, layer] = chosen
    profile = RoutingProfile(selected, E)
    order = profile.coactivation_order()
    freq = profile.frequency
    for layer, chain in enumerate(order):
        assert sorted(chain) == list(range(E))
        assert freq[layer, chain[0]] == freq[layer].max()
        where = {e: i for i, e in enumerate(chain)}
        assert all(abs(where[a] - where[b]) == 1 for a, b in pairs), (chain, pairs)


def _experts(rng, layers, n, hidden=64, inter=32, bits=4, group=32):
    def q(rows, cols):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), bits, group)

    return [[ExpertWeights(q(inter, hidden), q(inter, hidden), q(hidden, inter)) for _ in range(n)]
            for _ in range(layers)]


def test_an_ordered_image_holds_the_same_experts_in_that_order(rng, tmp_path):
    experts = _experts(rng, 2, 5)
    order = [[3, 0, 4, 1, 2], [1, 2, 0, 4, 3]]
    writer = ImageWriter(tmp_path / "e.bin", [[4] * 5] * 2, 64, 32, 32, "rows", tmp_path / "j", order=order)
    for layer in (1, 0):  # written in any order: every record's place follows from the plan and order
        for e in (4, 2, 0, 3, 1):
            writer.write(layer, e, 4, *record_payload(experts[layer][e]))
    table = writer.finish()
    assert [(r.layer, r.expert) for r in table] == [(l, e) for l in range(2) for e in range(5)]
    _, records = read_table(tmp_path / "e.bin")
    for layer in range(2):
        by_offset = sorted((r for r in records if r.layer == layer), key=lambda r: r.offset)
        assert [r.expert for r in by_offset] == order[layer]
        assert all(a.offset + a.length == b.offset for a, b in zip(by_offset, by_offset[1:]))
    back = read_experts(tmp_path / "e.bin")
    for layer in range(2):
        for e in range(5):
            for got, want in zip(back[layer][e].parts(), experts[layer][e].parts()):
                np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="names each layer's experts once"):
        ImageWriter(tmp_path / "f.bin", [[4] * 5] * 2, 64, 32, 32, "rows", tmp_path / "k", order=[[0, 1, 2, 3, 3]] * 2)


def test_a_calibrated_compile_lays_out_its_experts_by_coactivation(artifact_int4, trained_model):
    """The bundled model compiled with calibration text: each layer's records lie in the order the
    routing profile of that text gives, and the manifest says so."""
    import json

    from conftest import CALIBRATION

    from edgemoe.compiler.profile import profile_routing

    manifest = json.loads((artifact_int4 / "manifest.json").read_text())
    assert manifest["experts"]["order"] == "coactivation"
    tokens = tokenize_file(artifact_int4 / "tokenizer.json", CALIBRATION, manifest["profile"]["tokens"])
    order = profile_routing(trained_model, tokens).coactivation_order()
    _, records = read_table(artifact_int4 / "experts.bin")
    for layer, chain in enumerate(order):
        placed = sorted((r for r in records if r.layer == layer), key=lambda r: r.offset)
        assert [r.expert for r in placed] == chain
