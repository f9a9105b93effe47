"""The console's languages: negotiation, the catalogues (complete, compiled, in step with the sources),
the Jinja2 environments and their Babel filters, and the vendored browser assets' checksums."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from babel.messages import frontend
from babel.messages.catalog import Catalog
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.web import i18n

ROOT = Path(__file__).resolve().parents[2]
POT = i18n.LOCALES_DIR / "messages.pot"
VENDOR = ROOT / "src" / "dispatchd" / "static" / "vendor"


def po_path(locale: str) -> Path:
    return i18n.LOCALES_DIR / locale / "LC_MESSAGES" / "messages.po"


def load_po(path: Path, locale: str | None = None) -> Catalog:
    with path.open("rb") as fp:
        return read_po(fp, locale=locale)


def ids(catalog: Catalog) -> set[str | tuple[str, ...]]:
    return {message.id for message in catalog if message.id}


def key(value: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    return value if isinstance(value, str) else tuple(value)


def strings(message) -> tuple[str, ...]:
    return message.string if isinstance(message.string, tuple) else (message.string,)


# -------------------------------------------------------------------------------------- negotiation


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("en", "en"),
        ("fr", "fr"),
        ("en-US,en;q=0.9", "en"),
        ("fr-SN,fr;q=0.9,en;q=0.8", "fr"),
        ("fr-FR;q=0.5, en-GB;q=0.9", "en"),  # q-values, not the order, decide
        ("en;q=0.8, fr;q=0.8", "en"),  # a tie keeps the header's order
        ("de-DE, es;q=0.9, en;q=0.3", "en"),  # unsupported languages are passed over
        ("de, es, wo", "fr"),  # nothing supported: the default
        ("en;q=0, de", "fr"),  # q=0 means "not this one"
        ("EN-us", "en"),
        ("en_GB", "en"),
        ("*", "fr"),
        ("de, *;q=0.5", "fr"),
        (" en ; q=1.0 ", "en"),
        ("en;Q=0.4, fr;q=0.2", "en"),
    ],
)
def test_accept_language_respects_q_values(header: str, expected: str) -> None:
    assert i18n.negotiate(header, None) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        ",,,;;;",
        "en;q=abc",
        "en;q=2",
        "en;q=-1",
        "en;q=0.12345",
        "en;q",
        "q=1",
        "<script>alert(1)</script>",
        "en\x00",
        "éè, 中文",
        "en-" + "x" * 9,  # a subtag of more than 8 characters
        ";q=1, =en",
    ],
)
def test_garbage_headers_fall_back_to_french(header: str | None) -> None:
    assert i18n.negotiate(header, None) == "fr"


def test_garbage_entries_do_not_hide_good_ones() -> None:
    assert i18n.negotiate("en;q=abc, <b>, en-GB;q=0.7", None) == "en"


@pytest.mark.parametrize(
    ("header", "chosen", "expected"),
    [
        ("fr", "en", "en"),  # an explicit choice wins over the header
        ("en", "fr", "fr"),
        ("fr", "EN", "en"),
        ("fr", "en-GB", "en"),
        ("en", "de", "en"),  # an unsupported choice is ignored
        ("en", "", "en"),
        ("en", "   ", "en"),
        ("en", "*", "en"),
        ("en", "en;q=1", "en"),
        ("fr", "en" * 40, "fr"),  # an over-long cookie is ignored
        ("fr", "<script>", "fr"),
        (None, "en", "en"),
        (None, "xx", "fr"),
    ],
)
def test_an_explicit_choice_wins_when_supported(header: str | None, chosen: str, expected: str) -> None:
    assert i18n.negotiate(header, chosen) == expected


def test_long_headers_are_bounded() -> None:
    # 20 entries are read: a supported language in 20th place is found, in 21st it is not
    assert i18n.negotiate("de," * 19 + "en", None) == "en"
    assert i18n.negotiate("de," * 20 + "en", None) == "fr"
    # 200 characters are read, and an entry cut at the bound is dropped rather than misread
    assert len(i18n.parse_accept_language("de;q=0.5," * 1000)) <= i18n.MAX_HEADER_ENTRIES
    assert i18n.negotiate("x" * 198 + ",en", None) == "fr"  # cut to ",e", which is dropped
    padded = "de-" + "x" * 8 + ", "
    assert len(padded * 16) > i18n.MAX_HEADER_CHARS
    assert i18n.negotiate(padded * 16 + "en", None) == "fr"  # "en" sits past the 200th character
    assert i18n.parse_accept_language("de-CH-" + "a" * 200) == []
    assert i18n.negotiate("en;q=0.9," + " " * 10**6, None) == "en"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=400)), st.one_of(st.none(), st.text(max_size=60)))
def test_negotiate_always_answers_a_supported_locale(header: str | None, chosen: str | None) -> None:
    assert i18n.negotiate(header, chosen) in i18n.LOCALES
    assert len(i18n.parse_accept_language(header)) <= i18n.MAX_HEADER_ENTRIES


# -------------------------------------------------------------------------------------- catalogues


def test_the_template_is_in_step_with_the_sources() -> None:
    """Every message of the console's Python and templates is in messages.pot, and nothing else:
    after changing a message, run `make i18n` and translate what is new."""
    with (ROOT / "babel.cfg").open() as fp:
        parse = getattr(frontend, "parse_mapping_cfg", None) or frontend.parse_mapping
        method_map, options_map = parse(fp)
    extracted = {
        message_id if isinstance(message_id, str) else tuple(message_id)
        for _filename, _lineno, message_id, _comments, _context in extract_from_dir(
            i18n.WEB_DIR, method_map, options_map, keywords=DEFAULT_KEYWORDS
        )
    }
    with POT.open("rb") as fp:
        template = read_po(fp)
    template_ids = {m.id if isinstance(m.id, str) else tuple(m.id) for m in template if m.id}
    assert extracted - template_ids == set(), "messages missing from messages.pot: run `make i18n`"
    assert template_ids - extracted == set(), "stale messages in messages.pot: run `make i18n`"


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_each_catalogue_has_the_templates_messages(locale: str) -> None:
    template = load_po(POT)
    catalogue = load_po(po_path(locale), locale)
    assert ids(catalogue) == ids(template), f"{locale}: run `make i18n`"
    assert catalogue.locale is not None and str(catalogue.locale) == locale


def test_every_message_is_translated_in_french() -> None:
    template = load_po(POT)
    french = load_po(po_path("fr"), "fr")
    untranslated, fuzzy = [], []
    for message in template:
        if not message.id:
            continue
        translated = french.get(message.id)
        if translated is None or not all(s.strip() for s in strings(translated)):
            untranslated.append(message.id)
        elif translated.fuzzy:
            fuzzy.append(message.id)
    assert untranslated == [], f"untranslated in fr: {untranslated}"
    assert fuzzy == [], f"fuzzy in fr (review, then drop the flag): {fuzzy}"
    assert not french.fuzzy, "the fr catalogue's header is marked fuzzy"


def test_french_plurals_have_every_form() -> None:
    french = load_po(po_path("fr"), "fr")
    for message in french:
        if message.id and message.pluralizable:
            assert len(strings(message)) == french.num_plurals, message.id


_PLACEHOLDER = re.compile(r"%(?:\((\w+)\))?[-#0 +]*\d*(?:\.\d+)?[sdifgeExXr%]|\{\s*\w*\s*\}")


def placeholders(text: str) -> list[str]:
    return sorted(m.group(0) for m in _PLACEHOLDER.finditer(text) if m.group(0) != "%%")


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_placeholders_are_kept_in_translations(locale: str) -> None:
    catalogue = load_po(po_path(locale), locale)
    for message in catalogue:
        if not message.id:
            continue
        if isinstance(message.id, str):
            pairs = [(message.id, message.string)]
        else:
            singular, plural = message.id[0], message.id[1]
            forms = strings(message)
            pairs = [(singular, forms[0])] + [(plural, form) for form in forms[1:]]
        for source, translated in pairs:
            if translated:
                assert placeholders(translated) == placeholders(source), (source, translated)
    assert [error for _message, errors in catalogue.check() for error in errors] == []


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_compiled_catalogues_match_their_po(locale: str) -> None:
    """The .mo read at run time says what the .po says (after editing a .po: `make i18n`)."""
    catalogue = load_po(po_path(locale), locale)
    compiled = io.BytesIO()
    write_mo(compiled, catalogue)
    compiled.seek(0)
    expected = read_mo(compiled)
    with (po_path(locale).with_suffix(".mo")).open("rb") as fp:
        shipped = read_mo(fp)

    def contents(cat: Catalog) -> dict:
        return {key(message.id): key(message.string) for message in cat if message.id}

    assert contents(shipped) == contents(expected)
    assert shipped.plural_forms == expected.plural_forms


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_every_message_survives_newstyle_formatting(locale: str) -> None:
    """Jinja2's new-style gettext always applies ``%``: a lone "%" must be written "%%" in the template
    and in its translation, or rendering raises."""
    catalogue = load_po(po_path(locale), locale)
    for message in catalogue:
        if not message.id:
            continue
        for text in (*(message.id if isinstance(message.id, tuple) else (message.id,)), *strings(message)):
            values = {name: 1 for name in re.findall(r"%\((\w+)\)", text)}
            text % (values or {"num": 1})


# -------------------------------------------------------------------------------- the environments


def a_translated_message() -> str:
    """A singular message whose French differs from its English, the console's sign-in button if there."""
    french = load_po(po_path("fr"), "fr")
    for candidate in ("Sign in", "Sign out"):
        message = french.get(candidate)
        if message is not None and message.string:
            return candidate
    for message in french:
        if message.id and isinstance(message.id, str) and message.string and message.string != message.id:
            if "%" not in message.id:
                return message.id
    pytest.skip("the catalogue has no translated message yet")


def test_templates_render_in_the_requested_language() -> None:
    message = a_translated_message()
    source = "<p>{{ _(message) }}</p>"
    french = i18n.environment("fr").from_string(source).render(message=message)
    english = i18n.environment("en").from_string(source).render(message=message)
    assert french != english
    assert english == f"<p>{message}</p>"  # translations are trusted markup; variables are escaped
    assert french == "<p>" + i18n.translations("fr").gettext(message) + "</p>"


def test_sign_in_is_se_connecter() -> None:
    french = load_po(po_path("fr"), "fr")
    if french.get("Sign in") is None:
        pytest.skip("no 'Sign in' in the console yet")
    assert i18n.environment("fr").from_string("{{ _('Sign in') }}").render() == "Se connecter"
    assert i18n.environment("en").from_string("{{ _('Sign in') }}").render() == "Sign in"


def test_environments_are_cached_escape_html_and_know_their_locale() -> None:
    assert i18n.environment("fr") is i18n.environment("fr")
    assert i18n.environment("fr") is not i18n.environment("en")
    assert i18n.translations("en") is i18n.translations("en")
    out = i18n.environment("en").from_string("{{ locale }} {{ x }}").render(x="<b>")
    assert out == "en &lt;b&gt;"
    with pytest.raises(ValueError):
        i18n.environment("de")


def test_french_plurals_count_zero_as_singular() -> None:
    french = load_po(po_path("fr"), "fr")
    plural = next((m for m in french if m.id and isinstance(m.id, tuple) and "%(num)" in m.id[0]), None)
    if plural is None:
        pytest.skip("no plural message in the console yet")
    source = "{{ ngettext(singular, plural, n) }}"
    values = {"singular": plural.id[0], "plural": plural.id[1]}
    assert i18n.environment("fr").from_string(source).render(n=0, **values) == plural.string[0] % {"num": 0}
    assert i18n.environment("fr").from_string(source).render(n=2, **values) == plural.string[-1] % {"num": 2}
    assert i18n.environment("en").from_string(source).render(n=0, **values) == plural.id[1] % {"num": 0}
    assert i18n.environment("en").from_string(source).render(n=1, **values) == plural.id[0] % {"num": 1}


def test_plural_blocks_render_with_their_count() -> None:
    # a message absent from the catalogue falls back to its English forms
    source = "{% trans count=n %}{{ count }} zebra{% pluralize %}{{ count }} zebras{% endtrans %}"
    assert i18n.environment("en").from_string(source).render(n=1) == "1 zebra"
    assert i18n.environment("en").from_string(source).render(n=3) == "3 zebras"


def test_babel_filters_format_for_the_locale() -> None:
    moment = datetime(2025, 1, 3, 14, 5, tzinfo=UTC)

    def render(locale: str, source: str, **values) -> str:
        return i18n.environment(locale).from_string(source).render(**values)

    assert render("fr", "{{ t|format_datetime }}", t=moment) == "03/01/2025 14:05"
    assert render("en", "{{ t|format_datetime }}", t=moment) == "1/3/25, 2:05\u202fPM"
    assert render("fr", "{{ t|format_datetime(tz='Europe/Paris') }}", t=moment) == "03/01/2025 15:05"
    assert render("fr", "{{ t|format_datetime(tz='Africa/Dakar') }}", t=moment) == "03/01/2025 14:05"
    naive = moment.replace(tzinfo=None)  # naive datetimes are UTC
    assert render("fr", "{{ t|format_datetime(tz='Europe/Paris') }}", t=naive) == "03/01/2025 15:05"
    assert render("fr", "{{ t|format_datetime(tz='Nowhere/Else') }}", t=moment) == "03/01/2025 14:05"
    assert render("fr", "{{ t|format_datetime }}", t=None) == ""
    assert render("fr", "{{ n|format_number }}", n=12345.5) == "12\u202f345,5"
    assert render("en", "{{ n|format_number }}", n=12345.5) == "12,345.5"
    assert render("fr", "{{ r|format_percent }}", r=0.25) == "25\u00a0%"
    assert render("en", "{{ r|format_percent }}", r=0.25) == "25%"
    assert render("fr", "{{ d|format_timedelta }}", d=timedelta(minutes=3)) == "3\u00a0min"
    assert render("en", "{{ s|format_timedelta }}", s=180) == "3 min"
    assert render("fr", "{{ s|format_timedelta(format='long') }}", s=7200) == "2\u00a0heures"
    assert render("en", "{{ s|format_timedelta }}", s=None) == ""


# ------------------------------------------------------------------------------- vendored assets


def test_vendored_assets_match_the_checksums_in_their_readme() -> None:
    readme = (VENDOR / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.MULTILINE))
    assert set(listed) == {
        "htmx.min.js",
        "htmx.LICENSE",
        "uPlot.iife.min.js",
        "uPlot.min.css",
        "uPlot.LICENSE",
    }
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert {p.name for p in VENDOR.iterdir()} == set(listed) | {"README.md"}
