import pytest

from cacheblend.config import BlendConfig
from cacheblend.errors import ConfigError
from cacheblend.eval.methods import MethodSpecError, parse_method, parse_methods


def config(text: str, precompute: str | None = None) -> BlendConfig:
    return parse_method(text, precompute).blend_config(BlendConfig())


def test_plain_methods():
    for name in ("full", "prefix", "reuse", "blend", "epic"):
        spec = parse_method(name)
        assert (spec.label, spec.method) == (name, name)
    assert config("blend") == BlendConfig()


def test_blend_variants():
    # The default's two stages keep their 1.5:1 shape under an "@" ratio.
    assert config("blend@0.05").check_ratios == pytest.approx((0.075, 0.05))
    assert config("blend@0.2").check_ratios == pytest.approx((0.3, 0.2))
    c = config("blend[hkvd]-v@0.15:L1")
    assert (c.selector, c.deviation, c.check_ratios) == ("hkvd", "v", (0.15,))
    assert config("blend[hkvd]-k").deviation == "k"
    assert config("blend[qkvd]-kv").deviation == "kv"
    assert config("blend+first16").first_k == 16
    c = config("blend[hkvd]-v+first8@0.3:L1")
    assert (c.deviation, c.first_k, c.check_ratios) == ("v", 8, (0.3,))
    # qa alone reads no deviation: a deviation with it would silently do nothing.
    with pytest.raises(MethodSpecError, match=r"blend\[hkvd\]-v"):
        config("blend[qa]-v@0.15")
    assert config("blend-v@0.15").deviation == "v"  # the default's second stage reads it


def test_gradual_and_schedules():
    c = config("blend-gradual")
    assert (c.check_layers, c.check_ratios) == ((1, 4), (0.3, 0.15))
    c = config("blend-gradual@0.05")  # narrowed with the same 2:1 shape
    assert c.check_layers == (1, 4) and c.check_ratios == pytest.approx((0.1, 0.05))
    c = config("blend@0.15:L1=0.3,L4")
    assert (c.check_layers, c.check_ratios) == ((1, 4), (0.3, 0.15))
    c = config("blend:L2=0.5,L5=0.1")
    assert (c.check_layers, c.check_ratios) == ((2, 5), (0.5, 0.1))
    c = config("blend:L1=0.3,L4")  # last ratio: the config's
    assert c.check_ratios == (0.3, BlendConfig().ratio)


def test_epic_k():
    assert config("epic").epic_k == 16
    assert config("epic@32").epic_k == 32


def test_precompute_modes_and_labels():
    spec = parse_method("reuse/sink")
    assert (spec.label, spec.precompute) == ("reuse/sink", "sink")
    assert parse_method("blend", "alone").label == "blend/alone"
    assert parse_method("blend", "prefix").label == "blend"  # the default mode: plain label
    assert parse_method("blend", "preamble").label == "blend/preamble"
    assert parse_method("full", "sink").label == "full"  # full reads no chunk entries
    assert parse_method("blend@0.05/sink", "alone").precompute == "sink"  # own mode wins


def test_parse_methods_list():
    labels = [s.label for s in parse_methods("full,blend@0.15:L1=0.3,L4,epic@32")]
    assert labels == ["full", "blend@0.15:L1=0.3,L4", "epic@32"]
    labels = [s.label for s in parse_methods("full,reuse,blend", ["alone", "sink", "prefix"])]
    assert labels == ["full", "reuse/alone", "reuse/sink", "reuse", "blend/alone",
                      "blend/sink", "blend"]
    assert [s.label for s in parse_methods("blend,blend, ,full")] == ["blend", "full"]
    labels = [s.label for s in parse_methods("full,blend[qa,qkvd]@0.1:L0=0.2,L4,blend[qa]")]
    assert labels == ["full", "blend[qa,qkvd]@0.1:L0=0.2,L4", "blend[qa]"]


@pytest.mark.parametrize("text", [
    "", "foo", "full@0.1", "prefix-v", "reuse+first4", "blend@2", "blend@x", "epic@0.5",
    "epic-v", "blend-v-v", "blend@0.1@0.2", "blend%", "blend:L4=0.1,L1=0.3", "blend:L1,L4",
    "blend@0.1:L1=0.3,L4=0.2", "blend:L1=0.1,L4=0.3", "blend:X1", "blend-gradual:L1=0.3,L4",
    "blend/nowhere", "epic:L1",
])
def test_errors(text):
    with pytest.raises(MethodSpecError):
        parse_method(text)


def test_empty_list_is_an_error():
    with pytest.raises(MethodSpecError):
        parse_methods(" , ")


def test_selectors_coverage_and_probe():
    from cacheblend.config import BlendConfig

    spec = parse_method("blend[qkvd]~0.9+probe30@0.15:L2")
    assert spec.label == "blend[qkvd]~0.9+probe30@0.15:L2"
    config = spec.blend_config(BlendConfig())
    assert (config.selector, config.coverage, config.probe_layers) == ("qkvd", 0.9, 30)
    assert config.check_layers == (2,) and config.ratio == 0.15
    assert parse_method("blend[qa]@0.05/preamble").label == "blend[qa]@0.05/preamble"
    every = parse_method("blend[qa]+probe@0.12:L0")  # "+probe" alone: every layer
    assert every.label == "blend[qa]+probe@0.12:L0"
    assert every.blend_config(BlendConfig()).probe_layers == -1
    staged = parse_method("blend[qa,qkvd]+probe30@0.1:L0=0.2,L4")
    assert staged.label == "blend[qa,qkvd]+probe30@0.1:L0=0.2,L4"
    config = staged.blend_config(BlendConfig())
    assert config.selectors == ("qa", "qkvd")
    assert (config.check_layers, config.check_ratios) == ((0, 4), (0.2, 0.1))
    with pytest.raises(ConfigError):  # two selectors, one check layer
        parse_method("blend[qa,qkvd]@0.1:L0").blend_config(BlendConfig())
    # The default's two selectors do not fit a one-layer schedule: the spec must name one.
    with pytest.raises(MethodSpecError, match=r"name the selector"):
        parse_method("blend@0.15:L1").blend_config(BlendConfig())
    assert parse_method("blend[qa]@0.15:L1").blend_config(BlendConfig()).selectors == ("qa",)
    for bad in ("blend[nope]", "blend~1.5", "reuse[qa]", "epic[qa]", "blend[qa][qkvd]",
                "blend[qa,nope]"):
        with pytest.raises(MethodSpecError):
            parse_method(bad)


def test_eval_requests_never_borrow():
    """A row measures entries of its own precompute mode, even when another mode ran first."""
    from types import SimpleNamespace

    from cacheblend.config import BlendConfig

    engine = SimpleNamespace(config=SimpleNamespace(blend=BlendConfig()))
    for text in ("reuse", "blend", "blend/preamble", "epic"):
        assert parse_method(text).request_blend(engine).borrow is False
    assert BlendConfig().borrow is True  # serving borrows
