"""The catalogue and README agree; every DESIGN.md starting topic is declared."""

from pathlib import Path

from hooks import topics

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_every_catalogue_topic():
    text = README.read_text()
    missing = [name for name in topics.CATALOGUE if f"`{name}`" not in text]
    assert missing == []


def test_catalogue_rows_are_well_formed():
    for t in topics.CATALOGUE.values():
        assert t.kind in (topics.SCALAR, topics.HISTOGRAM, topics.TEXT), t
        assert t.delivery in ("sampled", "always", "alarm"), t
        assert t.doc and t.unit, t
