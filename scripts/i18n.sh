#!/usr/bin/env bash
# The message catalogues (app/i18n.py): extract every marked string of app/ and worker/ (Python and Jinja2) into
# app/locale/messages.pot, then merge it into app/locale/{en,ru}/LC_MESSAGES/messages.po. Run it after changing a
# user-facing string, translate what `--check` reports, commit the .pot and .po files (the service reads the .po
# files at runtime; nothing is compiled at install). tests/test_i18n.py fails while a msgid has no ru translation.
#   i18n.sh          extract and update the catalogues
#   i18n.sh --check  extract to a temporary file and say whether the committed catalogues are current
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYBABEL=.venv/bin/pybabel
POT=app/locale/messages.pot

extract() {
    mkdir -p app/locale
    "$PYBABEL" extract -F babel.cfg -k N_ --no-location --sort-output --no-wrap --project retrotest \
        -o "$1" . >/dev/null 2>&1
}

if [[ "${1:-}" == "--check" ]]; then
    fresh="$(mktemp)"
    trap 'rm -f "$fresh"' EXIT
    extract "$fresh"
    if ! diff -q <(grep -E '^(msgctxt|msgid)' "$POT") <(grep -E '^(msgctxt|msgid)' "$fresh") >/dev/null; then
        echo "i18n: $POT is out of date: run scripts/i18n.sh" >&2
        exit 1
    fi
    echo "i18n: $POT is current"
    exit 0
fi

extract "$POT"
for lang in en ru; do
    po="app/locale/$lang/LC_MESSAGES/messages.po"
    if [[ -f "$po" ]]; then
        "$PYBABEL" update --no-fuzzy-matching --ignore-obsolete --no-wrap -i "$POT" -d app/locale -l "$lang" >/dev/null 2>&1
    else
        "$PYBABEL" init --no-wrap -i "$POT" -d app/locale -l "$lang" >/dev/null 2>&1
    fi
done
echo "i18n: catalogues updated; translate the empty msgstr of app/locale/ru/LC_MESSAGES/messages.po"
