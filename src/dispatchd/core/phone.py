"""E.164 phone numbers (ITU-T E.164: '+', country code, at most 15 digits)."""

import re

#: The rule as a JSON Schema / OpenAPI ``pattern`` (the validators use the same expression).
E164_PATTERN = r"^\+[1-9]\d{6,14}$"
_E164 = re.compile(E164_PATTERN)


def is_e164(phone: str) -> bool:
    """True when ``phone`` is '+' followed by 7 to 15 digits, the first not 0."""
    return bool(_E164.match(phone))


#: A phone number inside any text: '+' and 7 to 15 digits (E.164), not inside a longer number.
_PHONE_IN_TEXT = re.compile(r"(?<![\w+])\+[1-9]\d{6,14}(?!\d)")


def mask_phone(phone: str) -> str:
    """``+221771234567`` → ``+2217…4567``: enough to tell two numbers apart in a log, not to call one."""
    return f"{phone[:5]}…{phone[-4:]}" if len(phone) > 9 else "+…"


def mask_phones(text: str) -> str:
    """Every E.164 number in ``text`` masked by :func:`mask_phone`."""
    return _PHONE_IN_TEXT.sub(lambda match: mask_phone(match.group()), text)
