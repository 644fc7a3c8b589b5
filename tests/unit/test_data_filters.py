"""Optional language and Gopher filters: off by default, each rejection counted by its rule."""

import json

import pytest

from elastic_moe.data.filters import FilterConfig, TextFilter
from elastic_moe.data.pipeline import PrepareConfig, prepare
from elastic_moe.data.readers import ReaderConfig

EN = ("The committee published its annual report on the quality of the water in the river, and "
      "the findings show that most of the monitored stretches have improved since last year. "
      "Farmers along the banks were asked to reduce the use of fertiliser, and the town has "
      "built a new treatment plant that cleans the waste water before it reaches the sea. ")
EN_B = ("On the second day of the festival the organisers moved the concerts indoors because of "
        "the storm, which had brought down two of the tents and flooded the car park. Most of "
        "the visitors stayed, and the bands played until late in the evening in the old hall. ")
DE = ("Der Ausschuss hat heute seinen Jahresbericht zur Wasserqualitaet des Flusses "
      "veroeffentlicht, und die Ergebnisse zeigen, dass sich die meisten der ueberwachten "
      "Abschnitte seit dem letzten Jahr deutlich verbessert haben. Die Landwirte wurden gebeten, "
      "weniger Duenger zu verwenden, und die Stadt hat eine neue Klaeranlage gebaut. ")
FR = ("Le comite a publie aujourd'hui son rapport annuel sur la qualite de l'eau de la riviere, "
      "et les resultats montrent que la plupart des troncons surveilles se sont ameliores depuis "
      "l'an dernier. Les agriculteurs ont ete invites a utiliser moins d'engrais. ")


def _reject(text, **kw):
    return TextFilter(FilterConfig(**kw)).reject_reason(text)


def test_language_filter_keeps_listed_languages():
    assert _reject(EN, languages=("en",)) == ""
    assert _reject(DE, languages=("en",)) == "lang_other"
    assert _reject(FR, languages=("en", "de")) == "lang_other"
    assert _reject(DE, languages=("en", "de")) == ""
    assert _reject("ok ok", languages=("en",), min_language_score=0.99) in ("lang_other",
                                                                            "lang_low_score")
    with pytest.raises(ValueError, match="languages="):
        FilterConfig(languages=("english!",))


def test_gopher_quality_rules():
    good = EN + EN_B
    assert _reject(good, gopher_quality=True) == ""
    assert _reject("Too short to be a document.", gopher_quality=True) == "gopher_word_count"
    assert _reject(" ".join(["supercalifragilistic"] * 60), gopher_quality=True) == \
        "gopher_mean_word_length"
    assert _reject(good + " #tag" * 40, gopher_quality=True) == "gopher_symbol_ratio"
    bullets = "\n".join(f"- item number {i} of the list with the things" for i in range(30))
    assert _reject(bullets, gopher_quality=True) == "gopher_bullet_lines"
    ellipsis = "\n".join(f"the story of {i} goes on and on and then..." for i in range(30))
    assert _reject(ellipsis, gopher_quality=True) == "gopher_ellipsis_lines"
    assert _reject(" ".join(["1234 5678 9012"] * 30), gopher_quality=True) == \
        "gopher_alpha_words"
    no_stop = " ".join(["river water report quality improved stretch farmers plant"] * 10)
    assert _reject(no_stop, gopher_quality=True) == "gopher_stop_words"


def test_gopher_repetition_rules():
    assert _reject(EN + EN_B, gopher_repetition=True) == ""
    paras = "\n\n".join(["Buy cheap watches online today with free shipping."] * 8 + [EN])
    assert _reject(paras, gopher_repetition=True) == "gopher_dup_paragraphs"
    lines = "\n".join([EN[:200], "Click here to subscribe!", "Click here to subscribe!",
                       "Click here to subscribe!", "Click here to subscribe!", EN[200:]])
    assert _reject(lines, gopher_repetition=True) == "gopher_dup_lines"
    assert _reject(EN + " ".join(["the river"] * 200), gopher_repetition=True) == \
        "gopher_top_2gram"
    assert _reject(EN + EN + EN, gopher_repetition=True).startswith("gopher_dup_")


def test_filters_are_off_by_default_and_counted_in_the_manifest(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    docs = [EN + f" Report number {i}." for i in range(20)] + \
        [DE + f" Nummer {i}." for i in range(5)] + ["Short line."] * 3
    with open(inp / "a.jsonl", "w") as fh:
        for i, text in enumerate(docs):
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    base = PrepareConfig(seq_len=32, vocab_size=300)
    off = prepare(str(inp), str(tmp_path / "off"), base, use_ray=False, progress=False)
    assert off["documents_in"] == 28
    assert not any(k.startswith(("lang_", "gopher_")) for k in off["skipped"])
    on = PrepareConfig(seq_len=32, vocab_size=300, reader=ReaderConfig(
        filters=FilterConfig(languages=("en",), gopher_quality=True, gopher_repetition=True)))
    manifest = prepare(str(inp), str(tmp_path / "on"), on, use_ray=False, progress=False)
    assert manifest["documents_in"] == 20
    assert manifest["skipped"]["lang_other"] + manifest["skipped"].get("lang_low_score", 0) \
        + manifest["skipped"].get("gopher_word_count", 0) == 8
