"""E.164 phone numbers (ITU-T E.164: '+', country code, at most 15 digits)."""

import re

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def is_e164(phone: str) -> bool:
    """True when ``phone`` is '+' followed by 7 to 15 digits, the first not 0."""
    return bool(_E164.match(phone))
